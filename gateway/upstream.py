"""Calls an upstream model through litellm: n=N or fan-out, bounded concurrency, retries, prices."""
from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

import gateway  # noqa: F401  (sets LITELLM_LOCAL_MODEL_COST_MAP before litellm is imported)
import httpx
import litellm

from gateway.config import Upstream

log = logging.getLogger("iapo.upstream")
litellm.suppress_debug_info = True
litellm.telemetry = False
for _name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy"):  # its INFO lines cost ~1 ms per call
    logging.getLogger(_name).setLevel(logging.WARNING)


@dataclass
class Completion:
    """One completion as the gateway records it; `error` set (and text None) when it failed."""

    text: str | None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    latency_s: float = 0.0
    error: str | None = None
    error_kind: str | None = None


@dataclass
class RawResponse:
    """One upstream call's result, whichever transport made it."""

    texts: list[str]
    finish_reasons: list[str | None]
    prompt_tokens: int
    completion_tokens: int


class UpstreamError(Exception):
    """A failed upstream call after retries; `kind` is a bounded label for metrics."""

    def __init__(self, kind: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status


DEFAULT_MAX_TOKENS = 1024  # the worst case assumed when neither caller nor prompt sets max_tokens
RETRYABLE = {"rate_limit", "server", "connection", "timeout"}
UPSTREAM_ERROR_KINDS = ("rate_limit", "server", "connection", "timeout", "bad_request", "auth", "other")


def classify(exc: Exception) -> UpstreamError:
    status = getattr(exc, "status_code", None)
    name = type(exc).__name__
    if isinstance(exc, (asyncio.TimeoutError, litellm.exceptions.Timeout)) or "Timeout" in name:
        kind = "timeout"
    elif status == 429 or isinstance(exc, litellm.exceptions.RateLimitError):
        kind = "rate_limit"
    elif (isinstance(exc, litellm.exceptions.APIConnectionError) and not status) or "connection error" in str(exc).lower():
        kind = "connection"  # litellm reports a refused connection as a 500 "Connection error."
    elif status is not None and status >= 500:
        kind = "server"
    elif status in (400, 404, 422):
        kind = "bad_request"
    elif status in (401, 403):
        kind = "auth"
    else:
        kind = "server" if isinstance(exc, litellm.exceptions.APIError) else "other"
    message = str(exc).splitlines()[0][:300] if str(exc) else name
    return UpstreamError(kind, message, status)


class UpstreamClient:
    """One configured upstream: litellm calls under a semaphore, with retries inside the timeout."""

    def __init__(self, name: str, config: Upstream, fallback: "UpstreamClient | None" = None) -> None:
        self.name = name
        self.config = config
        self.fallback = fallback
        self._slots = asyncio.Semaphore(config.max_concurrency)
        self._http: httpx.AsyncClient | None = None
        self.on_error = None  # callback(kind) for metrics

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    def price(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Dollar cost from the configured price, else litellm's cost table (0 when unknown)."""
        if self.config.price is not None:
            p = self.config.price
            return prompt_tokens * p.prompt_per_1k / 1000 + completion_tokens * p.completion_per_1k / 1000
        try:
            prompt_cost, completion_cost = litellm.cost_per_token(
                model=self.config.model, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
            return float(prompt_cost + completion_cost)
        except Exception:
            return 0.0

    def worst_case(self, messages: list[dict], params: dict) -> tuple[float, int]:
        """Upper bound of one completion's (dollars, tokens): a generous prompt estimate (chars / 3)
        plus max_tokens, at this upstream's price. Caps reserve this; cost clamps divide by it."""
        prompt_tokens = sum(len(str(m.get("content") or "")) for m in messages) // 3 + 8
        max_tokens = int(params.get("max_tokens") or DEFAULT_MAX_TOKENS)
        return self.price(prompt_tokens, max_tokens), prompt_tokens + max_tokens

    async def raw(self, messages: list[dict], params: dict, n: int) -> tuple[RawResponse, float]:
        """One call (n completions), retried on transient errors; returns (response, seconds)."""
        deadline = time.monotonic() + self.config.timeout
        attempt = 0
        while True:
            start = time.monotonic()
            try:
                async with self._slots:
                    left = max(0.1, deadline - time.monotonic())
                    # a total deadline: client timeouts are per read, and a trickling body never trips them
                    response = await asyncio.wait_for(self._send(messages, params, n, left), timeout=left)
                return response, time.monotonic() - start
            except Exception as exc:  # transports raise many types; classify once
                err = exc if isinstance(exc, UpstreamError) else classify(exc)
                if self.on_error:
                    self.on_error(self.name, err.kind)
                attempt += 1
                left = deadline - time.monotonic()
                if err.kind not in RETRYABLE or attempt > self.config.retries or left <= 0.05:
                    raise err from None
                await asyncio.sleep(min(left / 2, _backoff(attempt, exc)))

    async def _send(self, messages: list[dict], params: dict, n: int, timeout: float) -> RawResponse:
        if self.config.transport == "openai":
            return await self._send_openai(messages, params, n, timeout)
        response = await litellm.acompletion(
            model=self.config.model, messages=messages, n=n if n > 1 else None, api_base=self.config.api_base,
            api_key=self.config.api_key() or "none", timeout=timeout, max_retries=0, **params)
        usage = getattr(response, "usage", None)
        return RawResponse(
            texts=[c.message.content or "" for c in response.choices],
            finish_reasons=[c.finish_reason for c in response.choices],
            prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0))

    async def _send_openai(self, messages: list[dict], params: dict, n: int, timeout: float) -> RawResponse:
        """`transport: openai`: a pooled keep-alive POST to an OpenAI-compatible endpoint, no translation."""
        if self._http is None:
            self._http = httpx.AsyncClient(limits=httpx.Limits(max_connections=self.config.max_concurrency,
                                                               max_keepalive_connections=self.config.max_concurrency))
        body = {"model": self.config.model.split("/", 1)[-1], "messages": messages, **params}
        if n > 1:
            body["n"] = n
        key = self.config.api_key()
        headers = {"authorization": f"Bearer {key}"} if key else {}
        try:
            r = await self._http.post(f"{self.config.api_base.rstrip('/')}/chat/completions", json=body,
                                      headers=headers, timeout=timeout)
        except httpx.TimeoutException:
            raise UpstreamError("timeout", f"upstream timed out after {timeout:.1f}s") from None
        except httpx.TransportError as exc:
            raise UpstreamError("connection", f"upstream connection failed: {exc!r}") from None
        if r.status_code >= 400:
            kind = ("rate_limit" if r.status_code == 429 else "server" if r.status_code >= 500 else
                    "auth" if r.status_code in (401, 403) else "bad_request")
            err = UpstreamError(kind, f"upstream answered {r.status_code}: {r.text[:200]}", r.status_code)
            err.response = r
            raise err
        data = r.json()
        usage = data.get("usage") or {}
        choices = data.get("choices") or []
        return RawResponse(
            texts=[(c.get("message") or {}).get("content") or "" for c in choices],
            finish_reasons=[c.get("finish_reason") for c in choices],
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0))

    async def complete(self, messages: list[dict], params: dict, n: int) -> list[Completion]:
        """N completions: one call with n=N when the provider takes it, else N parallel calls.

        Failures come back as Completion(error=...) so the caller can aggregate the rest;
        a configured fallback upstream is tried when every completion failed.
        """
        if self.config.supports_n:
            completions = await self._call_n(messages, params, n)
        else:
            parts = await asyncio.gather(*(self._call_n(messages, params, 1) for _ in range(n)))
            completions = [c for part in parts for c in part]
        if self.fallback is not None and all(c.error for c in completions):
            return await self.fallback.complete(messages, params, n)
        return completions

    async def _call_n(self, messages: list[dict], params: dict, n: int) -> list[Completion]:
        try:
            response, seconds = await self.raw(messages, params, n)
        except UpstreamError as err:
            return [Completion(text=None, error=str(err), error_kind=err.kind) for _ in range(n)]
        return self._split(response, seconds, n)

    def _split(self, response: RawResponse, seconds: float, n: int) -> list[Completion]:
        """Per-completion tokens and cost from the call's usage (shared prompt split evenly)."""
        texts = response.texts[:n]
        choices = response.finish_reasons[:n]
        prompt_total, completion_total = response.prompt_tokens, response.completion_tokens
        lengths = [max(len(t), 1) for t in texts]
        share = [round(completion_total * l / sum(lengths)) for l in lengths]
        if share:
            share[-1] += completion_total - sum(share)
        prompt_share = [prompt_total // len(choices)] * len(choices) if choices else []
        if prompt_share:
            prompt_share[0] += prompt_total - sum(prompt_share)
        out = [
            Completion(text=t, finish_reason=finish, prompt_tokens=pt, completion_tokens=ct,
                       cost=self.price(pt, ct), latency_s=seconds)
            for finish, t, pt, ct in zip(choices, texts, prompt_share, share)
        ]
        out += [Completion(text=None, error="upstream returned fewer choices than requested", error_kind="short")
                for _ in range(n - len(out))]
        return out


def _backoff(attempt: int, exc: Exception) -> float:
    retry_after = None
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is not None:
        try:
            retry_after = float(headers.get("retry-after"))
        except (TypeError, ValueError):
            retry_after = None
    base = retry_after if retry_after is not None else 0.05 * 2 ** (attempt - 1)
    return base * (0.8 + 0.4 * random.random())
