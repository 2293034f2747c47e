"""OpenAI's wire format, in one place: response bodies, SSE events and chunks, error bodies."""
from __future__ import annotations

import json
from typing import Iterator

from gateway.errors import GatewayError, UpstreamRejected

SSE_DONE = b"data: [DONE]\n\n"
SSE_KEEPALIVE = b": keep-alive\n\n"
CHUNK_CHARS = 48  # characters per content delta when a finished completion is replayed as a stream


def error_body(err: GatewayError) -> dict:
    if isinstance(err, UpstreamRejected) and isinstance(err.body, dict) and isinstance(err.body.get("error"), dict):
        return err.body
    return {"error": {"message": err.message, "type": err.type, "code": err.code, "param": err.param}}


def sse(payload: dict, event: str | None = None) -> bytes:
    """One server-sent event carrying a JSON payload."""
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data}\n\n".encode()


def sse_error(err: GatewayError) -> bytes:
    """An error inside a stream that has already started (the status line was 200)."""
    return sse(error_body(err))


def usage_of(completions, details: dict | None = None) -> dict:
    """OpenAI `usage` summed over completions, with the provider's token details when it gave them."""
    prompt = sum(c.prompt_tokens for c in completions)
    completion = sum(c.completion_tokens for c in completions)
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    for key, value in (details or {}).items():
        usage[key] = value
    return usage


def chat_completion(*, request_id: str, created: int, model: str, completion, usage: dict,
                    system_fingerprint: str | None, extra: dict | None = None) -> dict:
    """A `chat.completion` whose one choice is the chosen completion's whole message."""
    message = dict(completion.message or {"role": "assistant", "content": completion.text})
    message.setdefault("role", "assistant")
    choice = {"index": 0, "message": message, "finish_reason": completion.finish_reason or "stop",
              "logprobs": completion.logprobs}
    body = {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [choice], "usage": usage, "system_fingerprint": system_fingerprint}
    if extra:
        body.update(extra)
    return body


def chat_chunks(body: dict, *, include_usage: bool) -> Iterator[bytes]:
    """A finished `chat.completion` replayed as `chat.completion.chunk` events, ending in [DONE]."""
    base = {"id": body["id"], "object": "chat.completion.chunk", "created": body["created"], "model": body["model"],
            "system_fingerprint": body.get("system_fingerprint")}
    choice = body["choices"][0]
    message = choice["message"]

    def chunk(delta: dict, finish: str | None = None, logprobs=None, **extra) -> bytes:
        return sse({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                         "logprobs": logprobs}], **extra})

    yield chunk({"role": "assistant", "content": "" if message.get("content") is not None else None})
    text = message.get("content") or ""
    logprobs = choice.get("logprobs")
    for i in range(0, len(text), CHUNK_CHARS):
        yield chunk({"content": text[i:i + CHUNK_CHARS]})
    if message.get("refusal"):
        yield chunk({"refusal": message["refusal"]})
    for i, call in enumerate(message.get("tool_calls") or []):
        yield chunk({"tool_calls": [{"index": i, **call}]})
    if logprobs:
        yield chunk({}, None, logprobs)
    extra = {"iapo": body["iapo"]} if "iapo" in body else {}
    yield chunk({}, choice["finish_reason"], **extra)
    if include_usage:
        yield sse({**base, "choices": [], "usage": body["usage"]})
    yield SSE_DONE


def model_object(model_id: str, owned_by: str) -> dict:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": owned_by}


def model_list(models: list[dict]) -> dict:
    return {"object": "list", "data": models}
