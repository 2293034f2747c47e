"""Scripted upstream: an OpenAI-compatible server that answers as a test scripts it and records every request.

`create_scripted_app(Script(...))` serves `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`,
`/v1/responses` (also without the `/v1` prefix) and `GET /v1/models` in the official wire format
(streams included), and the admin routes `GET /recorded`, `POST /recorded/clear`, `GET /stats`,
`POST /stats/clear`, `GET|POST /script`. The `Script` object passed in stays live: mutate it from Python
or replace it with `POST /script` (JSON; `?merge=true` keeps the fields not given). Latency and injected
faults apply to the POST endpoints, not to `/v1/models`.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Awaitable, Callable

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from sandbox import scripted_wire as wire
from sandbox.scripted_wire import Choice, count_tokens

DEFAULT_CONTENT = "Hello from the scripted upstream."
ADMIN_PATHS = {"/recorded", "/recorded/clear", "/stats", "/stats/clear", "/script"}
ERROR_KINDS = {400: ("invalid_request_error", None), 401: ("invalid_request_error", "invalid_api_key"),
               404: ("invalid_request_error", "model_not_found"), 429: ("requests", "rate_limit_exceeded")}
SSE_HEADERS = {"cache-control": "no-cache"}


@dataclass
class Script:
    """What the upstream answers; every field can be set from JSON (`POST /script`) or from Python."""

    content: str = DEFAULT_CONTENT
    contents: list[str] | None = None  # cycled per choice, so n choices differ
    tool_calls: list[dict] | None = None  # [{"name": ..., "arguments": str JSON or dict}] → finish "tool_calls"
    tool_calls_per_choice: list[list[dict]] | None = None  # cycled per choice
    refusal: str | None = None  # message.refusal set, content null
    finish_reason: str = "stop"  # of text answers
    chunk_count: int = 0  # streamed pieces per choice; 0: one per token
    chunk_delay: float = 0.0  # seconds between streamed chunks
    latency: float = 0.0  # seconds before the first byte
    status: int = 500  # the status of injected errors
    error_rate: float = 0.0  # fraction of requests that fail, spread evenly (deterministic)
    fail_next: int = 0  # the next K requests fail
    retry_after: float | None = None  # `retry-after` header of injected errors
    error_message: str = "The scripted upstream failed this request."
    prompt_tokens: int | None = None  # per request; default from the prompt's length
    completion_tokens: int | None = None  # per choice; default from the answer's length
    cached_tokens: int = 0
    reasoning_tokens: int = 0  # per choice, added to the default completion_tokens
    system_fingerprint: str = "fp_scripted"
    omit_usage: bool = False  # chat answers and streams carry no usage (as some servers do)
    embedding_dim: int = 16  # unless the request asks for `dimensions`
    models: list[str] = field(default_factory=lambda: ["scripted"])

    def update(self, values: dict[str, Any], reset: bool = False) -> "Script":
        """Set the given fields (an unknown name raises ValueError); `reset` restores the others' defaults."""
        known = {f.name: f for f in fields(self)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown Script fields: {', '.join(unknown)}")
        for name, f in known.items():
            if name in values:
                setattr(self, name, values[name])
            elif reset:
                setattr(self, name, f.default_factory() if f.default is MISSING else f.default)
        return self


class ScriptedState:
    """The live script, the recorded requests and the counters that the handlers share."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.records: list[dict] = []
        self.stats: dict[str, Any] = {}
        self.clear_stats()

    def clear_stats(self) -> None:
        """Zero the counters; requests still in flight stay counted."""
        in_flight = self.stats.get("in_flight", 0)
        self.stats = {"requests": 0, "by_path": {}, "errors": 0, "choices": 0,
                      "in_flight": in_flight, "max_in_flight": in_flight}
        self.error_debt = 0.0

    def enter(self) -> None:
        self.stats["in_flight"] += 1
        self.stats["max_in_flight"] = max(self.stats["max_in_flight"], self.stats["in_flight"])

    def leave(self) -> None:
        self.stats["in_flight"] -= 1

    def record(self, request: Request, body: Any) -> None:
        """Keep the body as received, the path, and whether an Authorization header came (never its value)."""
        path = request.url.path
        self.records.append({"path": path, "method": request.method, "body": body,
                             "authorization": "authorization" in request.headers, "time": time.time()})
        self.stats["requests"] += 1
        self.stats["by_path"][path] = self.stats["by_path"].get(path, 0) + 1

    def should_fail(self) -> bool:
        """The next `fail_next` requests fail, then `error_rate` of them, evenly spaced."""
        script = self.script
        if script.fail_next > 0:
            script.fail_next -= 1
            return True
        if script.error_rate > 0:
            self.error_debt += script.error_rate
            if self.error_debt >= 1 - 1e-9:
                self.error_debt -= 1
                return True
        return False


class InFlight:
    """ASGI middleware counting concurrent API requests until their last byte is sent."""

    def __init__(self, app, state: ScriptedState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in ADMIN_PATHS:
            await self.app(scope, receive, send)
            return
        self.state.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.leave()


def error_response(status: int, message: str, retry_after: float | None = None, param: str | None = None) -> Response:
    """An error body in OpenAI's format, with `retry-after` when given."""
    kind, code = ERROR_KINDS.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    headers = {"x-request-id": f"req_{uuid.uuid4().hex}"}
    if retry_after is not None:
        headers["retry-after"] = f"{retry_after:g}"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def text_of(value: Any) -> str:
    """All the text in a prompt: strings, message contents and content parts, concatenated."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(text_of(v) for v in value)
    if isinstance(value, dict):
        return text_of(value.get("content") if "content" in value else value.get("text", ""))
    return ""


def render_tool_calls(calls: list[dict]) -> list[dict]:
    """Scripted `{name, arguments}` as OpenAI tool calls with fresh `call_…` ids (dict arguments become JSON)."""
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": c["arguments"] if isinstance(c.get("arguments"), str)
                          else json.dumps(c.get("arguments") or {})}}
            for c in calls]


def plan_choice(script: Script, index: int) -> Choice:
    """Choice `index` as scripted: tool calls, else a refusal, else text (`contents` cycled)."""
    calls = script.tool_calls_per_choice[index % len(script.tool_calls_per_choice)] \
        if script.tool_calls_per_choice else script.tool_calls
    if calls:
        rendered = render_tool_calls(calls)
        text = "".join(c["function"]["name"] + c["function"]["arguments"] for c in rendered)
        content, refusal, finish = None, None, "tool_calls"
    elif script.refusal is not None:
        rendered, text, content, refusal, finish = None, script.refusal, None, script.refusal, "stop"
    else:
        text = script.contents[index % len(script.contents)] if script.contents else script.content
        rendered, content, refusal, finish = None, text, None, script.finish_reason
    tokens = script.completion_tokens if script.completion_tokens is not None \
        else count_tokens(text) + script.reasoning_tokens
    return Choice(index, content, refusal, rendered, finish, tokens)


def plan_choices(script: Script, n: int) -> list[Choice]:
    return [plan_choice(script, i) for i in range(n)]


def prompt_tokens(script: Script, prompt: Any) -> int:
    return script.prompt_tokens if script.prompt_tokens is not None else max(1, count_tokens(text_of(prompt)))


def usage(script: Script, prompt: int, choices: list[Choice]) -> dict:
    """Chat/completions `usage` with the prompt and completion token details."""
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": min(script.cached_tokens, prompt), "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": script.reasoning_tokens * len(choices),
                                          "audio_tokens": 0, "accepted_prediction_tokens": 0,
                                          "rejected_prediction_tokens": 0}}


def header(script: Script, body: dict, prefix: str, kind: str) -> dict:
    """The fields every answer starts with; `model` is the request's."""
    return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": kind, "created": int(time.time()),
            "model": body["model"], "system_fingerprint": script.system_fingerprint}


def top_logprobs(body: dict) -> int | None:
    """How many alternatives per token the request wants, None when it wants no logprobs."""
    return int(body.get("top_logprobs") or 0) if body.get("logprobs") else None


def include_usage(body: dict) -> bool:
    return bool((body.get("stream_options") or {}).get("include_usage"))


def stream(chunks) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)


def chat(state: ScriptedState, script: Script, body: dict) -> Response:
    """`chat.completion`, or its chunk stream when `stream` is true."""
    choices = plan_choices(script, int(body.get("n") or 1))
    state.stats["choices"] += len(choices)
    base = header(script, body, "chatcmpl", "chat.completion")
    totals = usage(script, prompt_tokens(script, body["messages"]), choices)
    if body.get("stream"):
        usage_chunk = totals if include_usage(body) and not script.omit_usage else None
        return stream(wire.chat_stream(base, choices, top_logprobs(body), usage_chunk,
                                       script.chunk_count, script.chunk_delay))
    answer = wire.chat_body(base, choices, top_logprobs(body), totals)
    if script.omit_usage:
        answer.pop("usage")
    return JSONResponse(answer)


def completions(state: ScriptedState, script: Script, body: dict) -> Response:
    """Legacy `text_completion`: n choices per prompt, `echo` and integer `logprobs` honoured."""
    prompts = body["prompt"] if isinstance(body["prompt"], list) and body["prompt"] \
        and isinstance(body["prompt"][0], str) else [body["prompt"]]
    n = int(body.get("n") or 1)
    choices = plan_choices(script, n * len(prompts))
    state.stats["choices"] += len(choices)
    texts = [(c.index, (text_of(prompts[c.index // n]) if body.get("echo") else "") + (c.content or c.refusal or ""),
              "stop" if c.finish_reason == "tool_calls" else c.finish_reason) for c in choices]
    top = body.get("logprobs")
    base = header(script, body, "cmpl", "text_completion")
    totals = usage(script, prompt_tokens(script, prompts), choices)
    if body.get("stream"):
        return stream(wire.completion_stream(base, texts, top, totals if include_usage(body) else None,
                                             script.chunk_count, script.chunk_delay))
    return JSONResponse({**base, "choices": [{"index": i, "text": text, "logprobs": wire.legacy_logprobs(text, top),
                                              "finish_reason": finish} for i, text, finish in texts],
                         "usage": totals})


def embeddings(state: ScriptedState, script: Script, body: dict) -> Response:
    """A list of deterministic `embedding` objects (float or base64), one per input."""
    inputs = body["input"]
    if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
        inputs = [inputs]
    texts = [v if isinstance(v, str) else " ".join(map(str, v)) for v in inputs]
    dims = int(body.get("dimensions") or script.embedding_dim)
    encoding = body.get("encoding_format") or "float"
    used = script.prompt_tokens if script.prompt_tokens is not None else sum(
        len(v) if isinstance(v, list) else max(1, count_tokens(v)) for v in inputs)
    return JSONResponse({"object": "list", "model": body["model"],
                         "data": [wire.embedding_item(i, t, dims, encoding) for i, t in enumerate(texts)],
                         "usage": {"prompt_tokens": used, "total_tokens": used}})


def response_output(choice: Choice) -> list[dict]:
    """Responses API output items for one choice: function calls, or one assistant message."""
    if choice.tool_calls:
        return [{"type": "function_call", "id": f"fc_{c['id'][5:]}", "call_id": c["id"], "status": "completed",
                 "name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in choice.tool_calls]
    part = {"type": "refusal", "refusal": choice.refusal} if choice.refusal is not None else \
        {"type": "output_text", "text": choice.content, "annotations": [], "logprobs": []}
    return [{"type": "message", "id": f"msg_{uuid.uuid4().hex[:24]}", "role": "assistant",
             "status": "completed", "content": [part]}]


def response_object(script: Script, body: dict, choice: Choice) -> dict:
    """A completed Responses API `response`, echoing the request's settings."""
    used = prompt_tokens(script, [body.get("instructions") or "", body.get("input") or ""])
    now = int(time.time())
    return {"id": f"resp_{uuid.uuid4().hex}", "object": "response", "created_at": now, "completed_at": now,
            "status": "completed", "error": None, "incomplete_details": None,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "model": body["model"], "output": response_output(choice), "parallel_tool_calls": True,
            "previous_response_id": body.get("previous_response_id"), "reasoning": {"effort": None, "summary": None},
            "store": body.get("store", True), "temperature": body.get("temperature", 1.0),
            "text": body.get("text") or {"format": {"type": "text"}}, "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [], "top_p": body.get("top_p", 1.0), "truncation": "disabled",
            "user": body.get("user"), "metadata": body.get("metadata") or {},
            "usage": {"input_tokens": used,
                      "input_tokens_details": {"cached_tokens": min(script.cached_tokens, used),
                                               "cache_write_tokens": 0},
                      "output_tokens": choice.completion_tokens,
                      "output_tokens_details": {"reasoning_tokens": script.reasoning_tokens},
                      "total_tokens": used + choice.completion_tokens}}


def responses(state: ScriptedState, script: Script, body: dict) -> Response:
    """A Responses API `response` (choice 0 of the script), or its event stream."""
    state.stats["choices"] += 1
    response = response_object(script, body, plan_choice(script, 0))
    if body.get("stream"):
        return stream(wire.responses_stream(response, script.chunk_count, script.chunk_delay))
    return JSONResponse(response)


def models(state: ScriptedState, script: Script, body: Any) -> Response:
    return JSONResponse({"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "scripted"}
                                                    for m in script.models]})


Builder = Callable[[ScriptedState, Script, Any], Response]


def api(state: ScriptedState, build: Builder, required: tuple[str, ...] = (),
        faults: bool = True) -> Callable[[Request], Awaitable[Response]]:
    """An endpoint: record the body, wait `latency` and inject faults (if `faults`), check `required`, answer."""
    async def endpoint(request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            state.record(request, raw.decode(errors="replace"))
            return error_response(400, "We could not parse the JSON body of your request.")
        state.record(request, body)
        script = state.script
        if faults and script.latency:
            await asyncio.sleep(script.latency)
        if faults and state.should_fail():
            state.stats["errors"] += 1
            return error_response(script.status, script.error_message, script.retry_after)
        if required and not isinstance(body, dict):
            return error_response(400, "The request body must be a JSON object.")
        for key in required:
            if key not in body:
                return error_response(400, f"Missing required parameter: '{key}'.", param=key)
        return build(state, script, body)
    return endpoint


def admin_routes(state: ScriptedState) -> list[Route]:
    """Recorded requests, counters and the live script."""
    async def recorded(request: Request) -> Response:
        return JSONResponse(state.records)

    async def clear_recorded(request: Request) -> Response:
        state.records.clear()
        return JSONResponse({"cleared": True})

    async def stats(request: Request) -> Response:
        return JSONResponse(state.stats)

    async def clear_stats(request: Request) -> Response:
        state.clear_stats()
        return JSONResponse(state.stats)

    async def script(request: Request) -> Response:
        if request.method == "POST":
            try:
                values = json.loads(await request.body() or b"{}")
                state.script.update(values, reset=request.query_params.get("merge", "").lower() != "true")
            except (ValueError, TypeError, AttributeError) as exc:
                return error_response(400, f"invalid script: {exc}")
            state.error_debt = 0.0
        return JSONResponse(asdict(state.script))

    return [Route("/recorded", recorded, methods=["GET"]), Route("/recorded/clear", clear_recorded, methods=["POST"]),
            Route("/stats", stats, methods=["GET"]), Route("/stats/clear", clear_stats, methods=["POST"]),
            Route("/script", script, methods=["GET", "POST"])]


def create_scripted_app(script: Script | None = None) -> Starlette:
    """The scripted upstream; `app.state.scripted` is its `ScriptedState` (script, records, stats)."""
    state = ScriptedState(script or Script())
    endpoints = [("/chat/completions", chat, ("model", "messages")), ("/completions", completions, ("model", "prompt")),
                 ("/embeddings", embeddings, ("model", "input")), ("/responses", responses, ("model",))]
    routes = [Route(prefix + path, api(state, build, required), methods=["POST"])
              for path, build, required in endpoints for prefix in ("/v1", "")]
    routes += [Route(path, api(state, models, faults=False), methods=["GET"]) for path in ("/v1/models", "/models")]
    app = Starlette(routes=routes + admin_routes(state), middleware=[Middleware(InFlight, state=state)])
    app.state.scripted = state
    return app
