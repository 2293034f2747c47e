"""Streaming plumbing: a relay that decouples the client from the upstream, and the bookkeeping of a
provider's stream (its usage, and the message its deltas add up to)."""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

from gateway.openai_wire import SSE_KEEPALIVE


class Relay:
    """The producer (upstream reader) runs in a task of its own and puts bytes here; the response body
    reads them. A client that goes away stops reading, never the producer, so the request is still
    settled, logged and counted. While nothing arrives, SSE keep-alive comments hold the connection."""

    MAX_QUEUED = 4096  # events waiting for a client that does not read: beyond this it is cut off

    def __init__(self, keepalive_s: float) -> None:
        self.keepalive_s = keepalive_s
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.client_gone = False
        self.opened: asyncio.Future = asyncio.get_running_loop().create_future()

    def put(self, data: bytes) -> None:
        if self.client_gone:
            return
        if self.queue.qsize() >= self.MAX_QUEUED:  # memory stays bounded: a client this slow is treated as gone
            self.client_gone = True
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(None)
            return
        self.queue.put_nowait(data)

    def close(self) -> None:
        self.queue.put_nowait(None)

    def open(self, error: BaseException | None = None) -> None:
        """Tell the handler whether the stream started (headers may be sent) or failed before it did."""
        if not self.opened.done():
            if error is None:
                self.opened.set_result(True)
            else:
                self.opened.set_exception(error)

    async def body(self) -> AsyncIterator[bytes]:
        finished = False
        getter: asyncio.Task | None = None
        try:
            while True:
                getter = getter or asyncio.ensure_future(self.queue.get())
                done, _ = await asyncio.wait({getter}, timeout=self.keepalive_s)
                if not done:
                    yield SSE_KEEPALIVE
                    continue
                item, getter = getter.result(), None
                if item is None:
                    finished = True
                    return
                yield item
        finally:
            if getter is not None:
                getter.cancel()
            if not finished:
                self.client_gone = True


def tokens_of(endpoint: str, data: dict | None) -> tuple[int, int] | None:
    """(prompt, completion) tokens from a body or stream event, when it carries usage."""
    if not isinstance(data, dict):
        return None
    if endpoint == "responses":
        usage = (data.get("response") or {}).get("usage") if data.get("type") else data.get("usage")
        if isinstance(usage, dict):
            return int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0)
        return None
    usage = data.get("usage")
    if isinstance(usage, dict):
        return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    return None


def is_usage_only(data: dict | None) -> bool:
    """The final chunk a provider sends for `stream_options.include_usage`: no choices, only usage."""
    return isinstance(data, dict) and data.get("choices") == [] and data.get("usage") is not None


class MessageBuilder:
    """Adds up a chat stream's deltas (choice 0) into the message they form: content, refusal, tool calls."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.refusal: list[str] = []
        self.calls: dict[int, dict] = {}
        self.finish_reason: str | None = None
        self.logprobs: list = []
        self.system_fingerprint: str | None = None
        self.upstream_id: str | None = None

    def add(self, chunk: dict) -> None:
        self.upstream_id = self.upstream_id or chunk.get("id")
        self.system_fingerprint = self.system_fingerprint or chunk.get("system_fingerprint")
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self.content.append(delta["content"])
            if delta.get("refusal"):
                self.refusal.append(delta["refusal"])
            for call in delta.get("tool_calls") or []:
                slot = self.calls.setdefault(call.get("index", 0), {"id": None, "type": "function",
                                                                   "function": {"name": "", "arguments": ""}})
                slot["id"] = call.get("id") or slot["id"]
                function = call.get("function") or {}
                slot["function"]["name"] += function.get("name") or ""
                slot["function"]["arguments"] += function.get("arguments") or ""
            with contextlib.suppress(AttributeError, TypeError):
                self.logprobs += (choice.get("logprobs") or {}).get("content") or []
            self.finish_reason = choice.get("finish_reason") or self.finish_reason

    def message(self) -> dict:
        message: dict = {"role": "assistant", "content": "".join(self.content) if self.content or not self.calls else None}
        if self.refusal:
            message["refusal"] = "".join(self.refusal)
        if self.calls:
            message["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
        return message
