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
from gateway.worst_case import Bound

log = logging.getLogger("iapo.upstream")

RETRYABLE = {"rate_limit", "server", "connection", "timeout"}
UPSTREAM_ERROR_KINDS = ("rate_limit", "server", "connection", "timeout", "bad_request", "not_found", "auth", "busy",
                        "other")


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
    unpriced: bool = False  # billed, but the provider said nothing of how much: its worst case is booked

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
    service_tier: str | None = None

    def extend(self, part: "Draw") -> None:
        """Add another call's (or wave's) completions and what its provider said."""
        self.completions += part.completions
        self.system_fingerprint = self.system_fingerprint or part.system_fingerprint
        self.service_tier = self.service_tier or part.service_tier
        self.upstream_ids += part.upstream_ids
        _add_details(self.usage_details, part.usage_details)


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

    def worst_case(self, bound: Bound) -> tuple[float, int]:
        """Upper bound of one completion's (dollars, tokens) here or on any fallback that may serve it.
        Caps reserve this; cost clamps divide by it."""
        dollars = max(client.price(bound.prompt_tokens, bound.completion_tokens) for client in self.chain())
        return dollars, bound.tokens_per_completion

    def chain(self) -> list["UpstreamClient"]:
        """This upstream and the fallbacks behind it, in order (config validation rules out cycles)."""
        out, client = [], self
        while client is not None and client not in out:
            out.append(client)
            client = client.fallback
        return out

    @property
    def deadline_s(self) -> float:
        """The longest one request can spend here: waiting for a slot (at most `timeout`), its calls
        (`timeout`), then its fallback's."""
        return 2 * self.config.timeout + (self.fallback.deadline_s if self.fallback else 0.0)

    # -- calls ----------------------------------------------------------------------------------
    def _note(self, err: UpstreamError) -> None:
        if self.on_error:
            self.on_error(self.name, err.kind)

    async def call(self, endpoint: str, body: dict) -> tuple[Reply, float]:
        """One request, retried on transient errors within the timeout; the fallback when it still fails."""
        try:
            reply, seconds = await self._call_here(endpoint, body)
        except UpstreamError as err:
            if self.fallback is None or err.kind not in RETRYABLE | {"auth", "not_found", "busy", "other"}:
                raise
            return await self.fallback.call(endpoint, {**body, "model": self.fallback.config.wire_model})
        reply.served_by = self.name
        return reply, seconds

    def served_by(self, reply: Reply) -> "UpstreamClient":
        """The client of the chain that answered `reply` (its price is the one to book)."""
        return next((c for c in self.chain() if c.name == reply.served_by), self)

    async def _slot(self) -> None:
        """Wait for a concurrency slot, at most `timeout`: time spent queueing here is the gateway's, so
        it does not eat into the upstream call's own deadline."""
        try:
            await asyncio.wait_for(self.slots.acquire(), timeout=self.config.timeout)
        except asyncio.TimeoutError:
            err = UpstreamError("busy", f"no free slot for upstream {self.name!r} within {self.config.timeout:.1f}s "
                                        f"(max_concurrency {self.config.max_concurrency})")
            self._note(err)
            raise err from None

    async def _call_here(self, endpoint: str, body: dict) -> tuple[Reply, float]:
        deadline = None  # the calls' total deadline starts once the first slot is held
        attempt = 0
        while True:
            await self._slot()
            start = time.monotonic()
            deadline = deadline or start + self.config.timeout
            try:
                left = max(0.1, deadline - time.monotonic())
                # a total deadline: client timeouts are per read, and a trickling body never trips them
                reply = await asyncio.wait_for(self.transport.post(endpoint, body, left), timeout=left)
                return reply, time.monotonic() - start
            except asyncio.TimeoutError:
                err = UpstreamError("timeout", f"upstream did not answer within {self.config.timeout:.1f}s")
            except UpstreamError as exc:
                err = exc
            finally:
                self.slots.release()
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
        deadline = None
        attempt = 0
        yielded = False
        while True:
            try:
                await self._slot()
                try:
                    deadline = deadline or time.monotonic() + self.config.timeout
                    async with self.transport.stream(endpoint, body, max(0.1, deadline - time.monotonic())) as events:
                        yielded = True
                        yield _bounded(events, deadline, self)
                finally:
                    self.slots.release()
                return
            except UpstreamError as err:
                if yielded:
                    raise
                if err.kind != "busy":  # _slot counted that one already
                    self._note(err)
                attempt += 1
                left = deadline - time.monotonic() if deadline is not None else 0.0
                if err.kind in RETRYABLE and attempt <= self.config.retries and left > 0.05:
                    await asyncio.sleep(min(left / 2, _backoff(attempt, err)))
                    continue
                if self.fallback is None or err.kind not in RETRYABLE | {"auth", "not_found", "busy", "other"}:
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
        draw = Draw([])
        for part in parts:
            draw.extend(part)
        return draw

    async def _draw_call(self, body: dict, n: int) -> Draw:
        request = {**body, "n": n} if n > 1 else {k: v for k, v in body.items() if k != "n"}
        try:
            reply, seconds = await self.call("chat", request)
        except UpstreamError as err:
            return Draw([Completion(None, error=str(err), error_kind=err.kind) for _ in range(n)])
        return self.served_by(reply).split(reply.body, seconds, n)

    def split(self, data: dict, seconds: float, n: int) -> Draw:
        """Per-completion tokens and cost from one answer's usage (the shared prompt split evenly). An
        answer without usage leaves its completions `unpriced`: the caller books their worst case."""
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        choices = sorted((c for c in data.get("choices") or [] if isinstance(c, dict)),
                         key=lambda c: c.get("index", 0) if isinstance(c.get("index"), int) else 0)[:n]
        prompt_total = _count(usage.get("prompt_tokens"))
        completion_total = _count(usage.get("completion_tokens"))
        lengths = [max(len(json.dumps(c.get("message") or {})), 1) for c in choices]
        share = [round(completion_total * l / sum(lengths)) for l in lengths] if lengths else []
        if share:
            share[-1] += completion_total - sum(share)
        prompt_share = [prompt_total // len(choices)] * len(choices) if choices else []
        if prompt_share:
            prompt_share[0] += prompt_total - sum(prompt_share)
        unpriced = "usage" not in data or "completion_tokens" not in usage
        completions = [
            Completion(message=c.get("message") if isinstance(c.get("message"), dict) else {"role": "assistant",
                                                                                            "content": ""},
                       finish_reason=c.get("finish_reason"), logprobs=c.get("logprobs"), prompt_tokens=pt,
                       completion_tokens=ct, cost=self.price(pt, ct), latency_s=seconds, unpriced=unpriced)
            for c, pt, ct in zip(choices, prompt_share, share)
        ]
        completions += [Completion(None, error="upstream returned fewer choices than requested", error_kind="short")
                        for _ in range(n - len(completions))]
        details = {k: v for k, v in usage.items() if k.endswith("_details") and isinstance(v, dict)}
        return Draw(completions, data.get("system_fingerprint"), details,
                    [data["id"]] if isinstance(data.get("id"), str) else [], data.get("service_tier"))


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


def _count(value) -> int:
    """A token count from a provider's usage, whatever type it came as (0 when unreadable)."""
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError):
        return 0


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
