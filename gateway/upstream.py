"""One configured upstream: its transport under a concurrency limit, retries inside a deadline,
fallback, prices and worst-case estimates, and N completions for a route."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import gateway  # noqa: F401  (sets LITELLM_LOCAL_MODEL_COST_MAP before litellm is imported)
from gateway.config import Upstream
from gateway.transports import DirectTransport, Event, LitellmTransport, Reply, UpstreamError

log = logging.getLogger("iapo.upstream")

DEFAULT_MAX_TOKENS = 1024  # the worst case assumed when neither caller nor prompt sets a token limit
RETRYABLE = {"rate_limit", "server", "connection", "timeout"}
UPSTREAM_ERROR_KINDS = ("rate_limit", "server", "connection", "timeout", "bad_request", "auth", "other")


@dataclass
class Completion:
    """One completion as the gateway records it; `error` set (and message None) when it failed."""

    message: dict | None
    finish_reason: str | None = None
    logprobs: dict | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    latency_s: float = 0.0
    error: str | None = None
    error_kind: str | None = None

    @property
    def text(self) -> str | None:
        if self.message is None:
            return None
        return self.message.get("content") or ""

    @property
    def tool_calls(self) -> list[dict]:
        return (self.message or {}).get("tool_calls") or []


@dataclass
class Draw:
    """N completions of one route request, with what the provider said about them as a whole."""

    completions: list[Completion]
    system_fingerprint: str | None = None
    usage_details: dict = field(default_factory=dict)
    upstream_ids: list[str] = field(default_factory=list)


def estimate_prompt_tokens(payload) -> int:
    """A generous bound on prompt tokens: characters of the JSON / 3 (real tokenisers give ~4 per token)."""
    return len(json.dumps(payload, ensure_ascii=False)) // 3 + 8


class UpstreamClient:
    """Calls one upstream under a semaphore, with retries inside a total deadline and a fallback."""

    def __init__(self, name: str, config: Upstream, fallback: "UpstreamClient | None" = None,
                 on_error: Callable[[str, str], None] | None = None) -> None:
        self.name = name
        self.config = config
        self.fallback = fallback
        self.on_error = on_error  # (upstream name, error kind) for metrics
        self.slots = asyncio.Semaphore(config.max_concurrency)
        self._transport: DirectTransport | LitellmTransport | None = None

    @property
    def transport(self) -> DirectTransport | LitellmTransport:
        if self._transport is None:
            self._transport = DirectTransport(self.config) if self.config.direct else LitellmTransport(self.config)
        return self._transport

    async def aclose(self) -> None:
        if self._transport is not None:
            await self._transport.aclose()

    # -- prices ---------------------------------------------------------------------------------
    def price(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Dollar cost from the configured price, else litellm's local cost table (0 when unknown)."""
        if self.config.price is not None:
            p = self.config.price
            return prompt_tokens * p.prompt_per_1k / 1000 + completion_tokens * p.completion_per_1k / 1000
        try:
            import litellm

            prompt_cost, completion_cost = litellm.cost_per_token(
                model=self.config.model, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
            return float(prompt_cost + completion_cost)
        except Exception:
            return 0.0

    def worst_case(self, payload, max_tokens: int | None, *, completes: bool = True) -> tuple[float, int]:
        """Upper bound of one completion's (dollars, tokens): the prompt bound plus the token limit
        (none for embeddings). Caps reserve this; cost clamps divide by it."""
        prompt_tokens = estimate_prompt_tokens(payload)
        completion = int(max_tokens or DEFAULT_MAX_TOKENS) if completes else 0
        return self.price(prompt_tokens, completion), prompt_tokens + completion

    @property
    def deadline_s(self) -> float:
        """The longest one request can spend here: its own timeout, then its fallback's."""
        return self.config.timeout + (self.fallback.deadline_s if self.fallback else 0.0)

    # -- calls ----------------------------------------------------------------------------------
    def _note(self, err: UpstreamError) -> None:
        if self.on_error:
            self.on_error(self.name, err.kind)

    async def call(self, endpoint: str, body: dict) -> tuple[Reply, float]:
        """One request, retried on transient errors within the timeout; the fallback when it still fails."""
        try:
            return await self._call_here(endpoint, body)
        except UpstreamError as err:
            if self.fallback is None or err.kind not in RETRYABLE | {"auth", "other"}:
                raise
            return await self.fallback.call(endpoint, {**body, "model": self.fallback.config.wire_model})

    async def _call_here(self, endpoint: str, body: dict) -> tuple[Reply, float]:
        deadline = time.monotonic() + self.config.timeout
        attempt = 0
        while True:
            start = time.monotonic()
            try:
                async with self.slots:
                    left = max(0.1, deadline - time.monotonic())
                    # a total deadline: client timeouts are per read, and a trickling body never trips them
                    reply = await asyncio.wait_for(self.transport.post(endpoint, body, left), timeout=left)
                return reply, time.monotonic() - start
            except asyncio.TimeoutError:
                err = UpstreamError("timeout", f"upstream did not answer within {self.config.timeout:.1f}s")
            except UpstreamError as exc:
                err = exc
            self._note(err)
            attempt += 1
            left = deadline - time.monotonic()
            if err.kind not in RETRYABLE or attempt > self.config.retries or left <= 0.05:
                raise err
            await asyncio.sleep(min(left / 2, _backoff(attempt, err)))

    @contextlib.asynccontextmanager
    async def stream(self, endpoint: str, body: dict) -> AsyncIterator[AsyncIterator[Event]]:
        """Open a stream (retried, then the fallback, until the provider accepts it) and yield its events.
        The concurrency slot is held until the stream is closed."""
        deadline = time.monotonic() + self.config.timeout
        attempt = 0
        yielded = False
        while True:
            try:
                async with self.slots:
                    async with self.transport.stream(endpoint, body, max(0.1, deadline - time.monotonic())) as events:
                        yielded = True
                        yield _bounded(events, deadline, self)
                return
            except UpstreamError as err:
                if yielded:
                    raise
                self._note(err)
                attempt += 1
                left = deadline - time.monotonic()
                if err.kind in RETRYABLE and attempt <= self.config.retries and left > 0.05:
                    await asyncio.sleep(min(left / 2, _backoff(attempt, err)))
                    continue
                if self.fallback is None or err.kind not in RETRYABLE | {"auth", "other"}:
                    raise
                async with self.fallback.stream(endpoint, {**body, "model": self.fallback.config.wire_model}) as events:
                    yield events
                return

    # -- N completions for a route --------------------------------------------------------------
    async def draw(self, body: dict, n: int) -> Draw:
        """N completions: one call with n=N where the provider takes it, else N parallel calls.
        Failures come back as Completion(error=...) so the caller can aggregate the rest."""
        if n == 1 or self.config.supports_n:
            parts = [await self._draw_call(body, n)]
        else:
            parts = await asyncio.gather(*(self._draw_call(body, 1) for _ in range(n)))
        draw = Draw([c for part in parts for c in part.completions])
        for part in parts:
            draw.system_fingerprint = draw.system_fingerprint or part.system_fingerprint
            draw.upstream_ids += part.upstream_ids
            _add_details(draw.usage_details, part.usage_details)
        return draw

    async def _draw_call(self, body: dict, n: int) -> Draw:
        request = {**body, "n": n} if n > 1 else {k: v for k, v in body.items() if k != "n"}
        try:
            reply, seconds = await self.call("chat", request)
        except UpstreamError as err:
            return Draw([Completion(None, error=str(err), error_kind=err.kind) for _ in range(n)])
        return self.split(reply.body, seconds, n)

    def split(self, data: dict, seconds: float, n: int) -> Draw:
        """Per-completion tokens and cost from one answer's usage (the shared prompt split evenly)."""
        usage = data.get("usage") or {}
        choices = sorted(data.get("choices") or [], key=lambda c: c.get("index", 0))[:n]
        prompt_total = int(usage.get("prompt_tokens") or 0)
        completion_total = int(usage.get("completion_tokens") or 0)
        lengths = [max(len(json.dumps(c.get("message") or {})), 1) for c in choices]
        share = [round(completion_total * l / sum(lengths)) for l in lengths] if lengths else []
        if share:
            share[-1] += completion_total - sum(share)
        prompt_share = [prompt_total // len(choices)] * len(choices) if choices else []
        if prompt_share:
            prompt_share[0] += prompt_total - sum(prompt_share)
        completions = [
            Completion(message=c.get("message") or {"role": "assistant", "content": ""},
                       finish_reason=c.get("finish_reason"), logprobs=c.get("logprobs"), prompt_tokens=pt,
                       completion_tokens=ct, cost=self.price(pt, ct), latency_s=seconds)
            for c, pt, ct in zip(choices, prompt_share, share)
        ]
        completions += [Completion(None, error="upstream returned fewer choices than requested", error_kind="short")
                        for _ in range(n - len(completions))]
        details = {k: v for k, v in usage.items() if k.endswith("_details") and isinstance(v, dict)}
        return Draw(completions, data.get("system_fingerprint"), details,
                    [data["id"]] if isinstance(data.get("id"), str) else [])


async def _bounded(events: AsyncIterator[Event], deadline: float, client: UpstreamClient) -> AsyncIterator[Event]:
    """A stream's events under the upstream's total deadline; errors after the first event are final."""
    iterator = events.__aiter__()
    while True:
        left = deadline - time.monotonic()
        try:
            event = await asyncio.wait_for(iterator.__anext__(), timeout=max(0.05, left))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            err = UpstreamError("timeout", f"upstream stream exceeded {client.config.timeout:.1f}s")
            client._note(err)
            raise err from None
        except UpstreamError as err:
            client._note(err)
            raise
        yield event


def _add_details(into: dict, details: dict) -> None:
    """Sum numeric token details (cached_tokens, reasoning_tokens, ...) across calls."""
    for name, values in details.items():
        bucket = into.setdefault(name, {})
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                bucket[key] = bucket.get(key, 0) + value


def _backoff(attempt: int, err: UpstreamError) -> float:
    base = err.retry_after if err.retry_after is not None else 0.05 * 2 ** (attempt - 1)
    return base * (0.8 + 0.4 * random.random())
