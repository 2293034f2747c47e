"""How a request body reaches a provider and its answer comes back, without retries or policy.

`DirectTransport` posts the body as it is to an OpenAI-compatible endpoint and hands back the
provider's bytes (and its stream's events) unchanged. `LitellmTransport` goes through litellm for
providers that need translation, and renders litellm's objects in OpenAI's format.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator


from gateway.config import Upstream

log = logging.getLogger("iapo.upstream")
logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per upstream call costs CPU and says nothing new

ENDPOINT_PATHS = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings",
                  "responses": "/responses"}


@dataclass
class Reply:
    """A provider's non-streaming answer: parsed, and the bytes as they came; `served_by` names the
    upstream that answered (the fallback's name when it did)."""

    body: dict
    raw: bytes
    headers: dict[str, str]
    served_by: str | None = None


@dataclass
class Event:
    """One server-sent event of a provider's stream: its bytes as received and its JSON payload."""

    raw: bytes
    data: dict | None
    done: bool = False


class UpstreamError(Exception):
    """A failed call; `kind` is a bounded label, `status`/`body` what the provider said if it answered."""

    def __init__(self, kind: str, message: str, status: int | None = None, body: dict | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind, self.status, self.body, self.retry_after = kind, status, body, retry_after


def kind_of_status(status: int) -> str:
    if status == 429:
        return "rate_limit"
    if status >= 500:
        return "server"
    if status in (401, 403):
        return "auth"
    if status == 404:
        return "not_found"  # an unknown model or path: the gateway's configuration, not the caller's request
    return "bad_request"


def _retry_after(headers) -> float | None:
    try:
        return float(headers.get("retry-after"))
    except (TypeError, ValueError):
        return None


class DirectTransport:
    """Pooled keep-alive HTTP to an OpenAI-compatible api_base; bodies and events forwarded verbatim.

    aiohttp, not httpx: on the request path httpx's connection pool costs about 2 ms of CPU per call
    here (bench/README.md), more than the rest of the gateway; aiohttp comes with litellm anyway."""

    def __init__(self, config: Upstream) -> None:
        self.url = {endpoint: config.base_url() + path for endpoint, path in ENDPOINT_PATHS.items()}
        key = config.api_key()
        self.headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
        self.max_connections = config.max_concurrency
        self._session = None  # made in the event loop that uses it

    def session(self):
        import aiohttp

        if self._session is None or self._session.closed:
            # keep-alive shorter than the usual server's 5 s, so a connection the server closed is not reused
            connector = aiohttp.TCPConnector(limit=self.max_connections, keepalive_timeout=4, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=True,
                                                  skip_auto_headers=("User-Agent",))
        return self._session

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()

    async def post(self, endpoint: str, body: dict, timeout: float) -> Reply:
        import aiohttp

        try:
            async with self.session().post(self.url[endpoint], data=_dumps(body), headers=self.headers,
                                           timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                content = await r.read()
                status, headers = r.status, r.headers
        except asyncio.TimeoutError:
            raise UpstreamError("timeout", f"upstream timed out after {timeout:.1f}s") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError("connection", f"upstream connection failed: {exc!r}") from None
        if status >= 400:
            raise _status_error(status, content, headers)
        try:
            parsed = json.loads(content)
        except ValueError:
            raise UpstreamError("server", f"upstream answered {status} with a body that is not JSON") from None
        if not isinstance(parsed, dict):
            raise UpstreamError("server", f"upstream answered {status} with JSON that is not an object")
        return Reply(parsed, content, dict(headers))

    @contextlib.asynccontextmanager
    async def stream(self, endpoint: str, body: dict, timeout: float) -> AsyncIterator[AsyncIterator[Event]]:
        """Open the stream (a provider error before the first event raises UpstreamError), yield its events."""
        import aiohttp

        try:
            response = await self.session().post(self.url[endpoint], data=_dumps(body),
                                                 headers={**self.headers, "accept": "text/event-stream"},
                                                 timeout=aiohttp.ClientTimeout(total=timeout))
        except asyncio.TimeoutError:
            raise UpstreamError("timeout", f"upstream timed out after {timeout:.1f}s") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError("connection", f"upstream connection failed: {exc!r}") from None
        try:
            if response.status >= 400:
                raise _status_error(response.status, await response.read(), response.headers)
            yield _events(response)
        finally:
            response.release()


async def _events(response) -> AsyncIterator[Event]:
    """Split an SSE byte stream into events (blank-line separated), keeping each event's bytes."""
    import aiohttp

    lines: list[str] = []
    pending = b""
    try:
        async for data in response.content.iter_any():  # no line-length limit: a chunk may carry a long line
            pending += data
            *complete, pending = pending.split(b"\n")
            for raw_line in complete:
                line = raw_line.decode("utf-8", "replace").rstrip("\r")
                if line:
                    lines.append(line)
                elif lines:
                    yield _event(lines)
                    lines = []
        if pending.strip():
            lines.append(pending.decode("utf-8", "replace").rstrip("\r"))
        if lines:
            yield _event(lines)
    except asyncio.TimeoutError:
        raise UpstreamError("timeout", "upstream stream timed out") from None
    except aiohttp.ClientError as exc:
        raise UpstreamError("connection", f"upstream stream broke: {exc!r}") from None


def _event(lines: list[str]) -> Event:
    raw = ("\n".join(lines) + "\n\n").encode()
    payload = "\n".join(l[5:].lstrip(" ") if l.startswith("data:") else "" for l in lines if l.startswith("data:"))
    if payload.strip() == "[DONE]":
        return Event(raw, None, done=True)
    try:
        data = json.loads(payload) if payload else None
    except ValueError:
        data = None
    return Event(raw, data if isinstance(data, dict) else None)


def _status_error(status: int, content: bytes, headers) -> UpstreamError:
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    text = content[:200].decode("utf-8", "replace")
    return UpstreamError(kind_of_status(status), f"upstream answered {status}: {text}", status,
                         body if isinstance(body, dict) else None, _retry_after(headers))


def _dumps(body: dict) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def openai_params(endpoint: str) -> frozenset[str]:
    """The request fields of OpenAI's API for an endpoint (from the `openai` package litellm depends on)."""
    from openai.types import completion_create_params, embedding_create_params
    from openai.types.chat import completion_create_params as chat_params
    from openai.types.responses import response_create_params

    typed = {"chat": chat_params.CompletionCreateParamsBase, "completions": completion_create_params.CompletionCreateParamsBase,
             "embeddings": embedding_create_params.EmbeddingCreateParams,
             "responses": response_create_params.ResponseCreateParamsBase}[endpoint]
    return frozenset(typed.__annotations__) | {"stream", "n"}


# fields litellm reads as its own settings (where to send, with which key, mocks, logging): never a caller's
LITELLM_OWN = frozenset({"model", "metadata"})


class LitellmTransport:
    """Calls through litellm (any provider it knows); answers rendered as OpenAI JSON."""

    def __init__(self, config: Upstream) -> None:
        import litellm  # imported on first use: ~5 s, and only upstreams that need translation pay it

        litellm.suppress_debug_info = True
        litellm.telemetry = False
        for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy"):  # a line per call (twice with basicConfig)
            logging.getLogger(name).setLevel(logging.WARNING)
        self.litellm = litellm
        self.config = config
        self.functions = {"chat": litellm.acompletion, "completions": litellm.atext_completion,
                          "embeddings": litellm.aembedding, "responses": litellm.aresponses}
        self.params = {endpoint: openai_params(endpoint) - LITELLM_OWN for endpoint in self.functions}

    async def aclose(self) -> None:
        return None

    def _kwargs(self, endpoint: str, body: dict, timeout: float) -> dict[str, Any]:
        """OpenAI's own fields as litellm arguments; anything else rides in `extra_body`, so a caller can
        never set litellm's (api_base, api_key, mock_response, ...). The gateway's settings come last."""
        known = {k: v for k, v in body.items() if k in self.params[endpoint]}
        extra = {k: v for k, v in body.items() if k not in self.params[endpoint] and k != "model"}
        if extra:
            known["extra_body"] = extra
        return {**known, "model": self.config.model, "api_base": self.config.api_base,
                "api_key": self.config.api_key() or "none", "timeout": timeout, "max_retries": 0}

    async def post(self, endpoint: str, body: dict, timeout: float) -> Reply:
        try:
            response = await self.functions[endpoint](**self._kwargs(endpoint, body, timeout))
        except Exception as exc:
            raise classify_litellm(exc) from None
        data = _plain(response)
        return Reply(data, _dumps(data), {})

    @contextlib.asynccontextmanager
    async def stream(self, endpoint: str, body: dict, timeout: float) -> AsyncIterator[AsyncIterator[Event]]:
        try:
            response = await self.functions[endpoint](**self._kwargs(endpoint, {**body, "stream": True}, timeout))
        except Exception as exc:
            raise classify_litellm(exc) from None

        async def events() -> AsyncIterator[Event]:
            try:
                async for chunk in response:
                    data = _plain(chunk)
                    name = data.get("type") if endpoint == "responses" else None
                    raw = (f"event: {name}\n" if name else "") + f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
                    yield Event(raw.encode(), data)
            except Exception as exc:
                raise classify_litellm(exc) from None
            if endpoint != "responses":
                yield Event(b"data: [DONE]\n\n", None, done=True)

        yield events()


def _plain(obj: Any) -> dict:
    """litellm's pydantic objects as plain JSON-able dicts."""
    if isinstance(obj, dict):
        return obj
    for method in ("model_dump", "dict"):
        if hasattr(obj, method):
            with contextlib.suppress(Exception):
                return json.loads(json.dumps(getattr(obj, method)(), default=str))
    return json.loads(json.dumps(obj, default=lambda o: getattr(o, "__dict__", str(o))))


def classify_litellm(exc: Exception) -> UpstreamError:
    """litellm raises many exception types; map them onto the bounded kinds."""
    if isinstance(exc, UpstreamError):
        return exc
    import litellm

    status = getattr(exc, "status_code", None)
    name = type(exc).__name__
    if isinstance(exc, (asyncio.TimeoutError, litellm.exceptions.Timeout)) or "Timeout" in name:
        kind = "timeout"
    elif status == 429 or isinstance(exc, litellm.exceptions.RateLimitError):
        kind = "rate_limit"
    elif (isinstance(exc, litellm.exceptions.APIConnectionError) and not status) or "connection error" in str(exc).lower():
        kind = "connection"  # litellm reports a refused connection as a 500 "Connection error."
    elif isinstance(status, int):
        kind = kind_of_status(status)
    else:
        kind = "server" if isinstance(exc, litellm.exceptions.APIError) else "other"
    message = str(exc).splitlines()[0][:300] if str(exc) else name
    response = getattr(exc, "response", None)
    body = None
    with contextlib.suppress(Exception):
        body = response.json() if response is not None else None
    return UpstreamError(kind, message, status if isinstance(status, int) else None,
                         body if isinstance(body, dict) else None,
                         _retry_after(getattr(response, "headers", None) or {}))
