"""OpenAI wire format for the scripted upstream: answer bodies, logprobs, and the SSE streams.

Pure rendering: `sandbox.scripted` decides what to answer (a list of `Choice`) and these functions
write it as the official API does (chat.completion[.chunk], text_completion, embeddings, response).
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import re
import struct
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

TOKEN_RE = re.compile(r"\s*\S+|\s+$")
DONE = b"data: [DONE]\n\n"


@dataclass
class Choice:
    """One scripted choice: text, refusal or tool calls (rendered with ids), and its token count."""

    index: int
    content: str | None
    refusal: str | None
    tool_calls: list[dict] | None
    finish_reason: str
    completion_tokens: int


def tokens(text: str) -> list[str]:
    """Space-split tokens that keep their leading whitespace, so they concatenate back to `text`."""
    return TOKEN_RE.findall(text)


def count_tokens(text: str) -> int:
    """The default token count of a text: one token per four characters, rounded up."""
    return (len(text) + 3) // 4


def split_text(text: str, count: int) -> list[str]:
    """`text` in `count` streamed pieces (whole tokens when there are enough), one per token if count <= 0."""
    parts = tokens(text)
    if count <= 0 or not text:
        return parts
    if count > len(parts):
        parts, count = list(text), min(count, len(text))
    size = len(parts)
    return ["".join(parts[i * size // count:(i + 1) * size // count]) for i in range(count)]


def sse(payload: dict) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def sse_event(name: str, payload: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(payload)}\n\n".encode()


def token_logprob(token: str) -> float:
    """A deterministic logprob in (-2, 0) from the token text."""
    return -round(zlib.crc32(token.encode()) % 2000 / 1000 + 0.001, 3)


def logprob_entries(text: str | None, top: int) -> list[dict] | None:
    """Chat `logprobs.content` entries, one per token, each with `top` alternatives (itself first)."""
    if text is None:
        return None
    entries = []
    for token in tokens(text):
        lp = token_logprob(token)
        alternatives = [(token, lp)] + [(f"{token}~{k}", round(lp - k, 3)) for k in range(1, top)]
        entries.append({"token": token, "logprob": lp, "bytes": list(token.encode()),
                        "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                                         for t, v in alternatives[:top]]})
    return entries


def chat_logprobs(choice: Choice, top: int | None) -> dict | None:
    """`choices[i].logprobs` when requested (`top` is None when the request has no `logprobs: true`)."""
    if top is None:
        return None
    return {"content": logprob_entries(choice.content, top), "refusal": logprob_entries(choice.refusal, top)}


def legacy_logprobs(text: str, top: int | None, offset: int = 0) -> dict | None:
    """Legacy completions `logprobs`: tokens, token_logprobs, top_logprobs (dicts), text_offset."""
    if top is None:
        return None
    toks = tokens(text)
    offsets = list(itertools.accumulate((len(t) for t in toks[:-1]), initial=offset))
    return {"tokens": toks, "token_logprobs": [token_logprob(t) for t in toks],
            "top_logprobs": [{e["token"]: e["logprob"] for e in entry["top_logprobs"]}
                             for entry in logprob_entries(text, top)],
            "text_offset": offsets if toks else []}


def chat_message(choice: Choice) -> dict:
    """The assistant message; `tool_calls` only when there are some, as the official API sends it."""
    message = {"role": "assistant", "content": choice.content, "refusal": choice.refusal, "annotations": []}
    return {**message, "tool_calls": choice.tool_calls} if choice.tool_calls else message


def chat_body(base: dict, choices: list[Choice], top: int | None, usage: dict) -> dict:
    """A non-streaming `chat.completion`; `base` holds id, object, created, model, system_fingerprint."""
    return {**base, "choices": [{"index": c.index, "message": chat_message(c), "logprobs": chat_logprobs(c, top),
                                 "finish_reason": c.finish_reason} for c in choices],
            "usage": usage, "service_tier": "default"}


def tool_call_header(position: int, call: dict) -> dict:
    """The first delta of a streamed tool call: index, id, type, name and empty arguments."""
    return {"index": position, "id": call["id"], "type": "function",
            "function": {"name": call["function"]["name"], "arguments": ""}}


def chat_first_delta(choice: Choice) -> dict:
    delta = {"role": "assistant", "content": None if choice.content is None else "", "refusal": None}
    if choice.refusal is not None:
        delta["refusal"] = ""
    if choice.tool_calls:
        delta["tool_calls"] = [tool_call_header(0, choice.tool_calls[0])]
    return delta


def chat_pieces(choice: Choice, count: int, top: int | None) -> list[tuple[dict, dict | None]]:
    """The (delta, logprobs) pairs after the first delta: text or refusal pieces, or tool-call fragments."""
    if choice.tool_calls:
        out: list[tuple[dict, dict | None]] = []
        for position, call in enumerate(choice.tool_calls):
            if position:
                out.append(({"tool_calls": [tool_call_header(position, call)]}, None))
            out += [({"tool_calls": [{"index": position, "function": {"arguments": fragment}}]}, None)
                    for fragment in split_text(call["function"]["arguments"], count)]
        return out
    key = "refusal" if choice.refusal is not None else "content"
    text = choice.refusal if key == "refusal" else choice.content or ""
    if top is None:
        return [({key: piece}, None) for piece in split_text(text, count)]
    other = "content" if key == "refusal" else "refusal"
    return [({key: piece}, {key: logprob_entries(piece, top), other: None}) for piece in split_text(text, count)]


async def chat_stream(base: dict, choices: list[Choice], top: int | None, usage: dict | None,
                      count: int, delay: float) -> AsyncIterator[bytes]:
    """`chat.completion.chunk` events as OpenAI streams them; the usage chunk only when `usage` is given."""
    chunk_base = {**base, "object": "chat.completion.chunk", "service_tier": "default"}
    if usage is not None:
        chunk_base["usage"] = None

    def chunk(index: int, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> bytes:
        return sse({**chunk_base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                               "finish_reason": finish}]})

    for choice in choices:
        yield chunk(choice.index, chat_first_delta(choice))
    rounds = [chat_pieces(choice, count, top) for choice in choices]
    for k in range(max(map(len, rounds), default=0)):
        await asyncio.sleep(delay)
        for choice, pieces in zip(choices, rounds):
            if k < len(pieces):
                yield chunk(choice.index, pieces[k][0], None, pieces[k][1])
    for choice in choices:
        yield chunk(choice.index, {}, choice.finish_reason)
    if usage is not None:
        yield sse({**chunk_base, "choices": [], "usage": usage})
    yield DONE


async def completion_stream(base: dict, texts: list[tuple[int, str, str]], top: int | None,
                            usage: dict | None, count: int, delay: float) -> AsyncIterator[bytes]:
    """Legacy `text_completion` stream events for (index, text, finish_reason) triples."""
    def chunk(index: int, text: str, logprobs: dict | None, finish: str | None) -> bytes:
        payload = {**base, "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
        return sse(payload if usage is None else {**payload, "usage": None})

    rounds = [split_text(text, count) for _, text, _ in texts]
    offsets = [0] * len(texts)
    for k in range(max(map(len, rounds), default=0)):
        if k:
            await asyncio.sleep(delay)
        for i, ((index, _, _), pieces) in enumerate(zip(texts, rounds)):
            if k < len(pieces):
                yield chunk(index, pieces[k], legacy_logprobs(pieces[k], top, offsets[i]), None)
                offsets[i] += len(pieces[k])
    for index, _, finish in texts:
        yield chunk(index, "", None, finish)
    if usage is not None:
        yield sse({**base, "choices": [], "usage": usage})
    yield DONE


def embedding_vector(text: str, dimensions: int) -> list[float]:
    """A deterministic unit vector of `dimensions` floats derived from the text's hash."""
    raw = b"".join(hashlib.sha256(f"{text}:{i}".encode()).digest() for i in range((dimensions + 7) // 8))
    values = [v / 2**31 - 1.0 for v in struct.unpack(f"<{dimensions}I", raw[:4 * dimensions])]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return [round(v / norm, 6) for v in values]


def embedding_item(index: int, text: str, dimensions: int, encoding: str) -> dict:
    """One `embedding` object; base64 is little-endian float32 as the official API sends it."""
    vector = embedding_vector(text, dimensions)
    if encoding == "base64":
        vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return {"object": "embedding", "index": index, "embedding": vector}


async def responses_stream(response: dict, count: int, delay: float) -> AsyncIterator[bytes]:
    """Responses API events: created, in_progress, per-item added/deltas/done, then completed."""
    sequence = itertools.count()

    def event(kind: str, **data) -> bytes:
        return sse_event(kind, {"type": kind, "sequence_number": next(sequence), **data})

    skeleton = {**response, "status": "in_progress", "output": [], "usage": None, "completed_at": None}
    yield event("response.created", response=skeleton)
    yield event("response.in_progress", response=skeleton)
    for position, item in enumerate(response["output"]):
        where = {"item_id": item["id"], "output_index": position}
        if item["type"] == "function_call":
            yield event("response.output_item.added", output_index=position,
                        item={**item, "arguments": "", "status": "in_progress"})
            for fragment in split_text(item["arguments"], count):
                await asyncio.sleep(delay)
                yield event("response.function_call_arguments.delta", **where, delta=fragment)
            yield event("response.function_call_arguments.done", **where, arguments=item["arguments"])
        else:
            yield event("response.output_item.added", output_index=position,
                        item={**item, "content": [], "status": "in_progress"})
            part = item["content"][0]
            key = "text" if part["type"] == "output_text" else "refusal"
            yield event("response.content_part.added", **where, content_index=0, part={**part, key: ""})
            kind = "response.output_text" if key == "text" else "response.refusal"
            for piece in split_text(part[key], count):
                await asyncio.sleep(delay)
                yield event(f"{kind}.delta", **where, content_index=0, delta=piece,
                            **({"logprobs": []} if key == "text" else {}))
            yield event(f"{kind}.done", **where, content_index=0, **{key: part[key]},
                        **({"logprobs": []} if key == "text" else {}))
            yield event("response.content_part.done", **where, content_index=0, part=part)
        yield event("response.output_item.done", output_index=position, item=item)
    yield event("response.completed", response=response)
