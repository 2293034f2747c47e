"""Connection hygiene under uvicorn: header and idle timeouts, a per-process connection cap, body limits.

Serve with `uvicorn.run(..., **uvicorn_options(limits, workers=n))` and wrap the ASGI app in `BodyLimit`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

try:
    import resource
except ImportError:  # pragma: no cover - not POSIX
    resource = None  # type: ignore[assignment]
try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _Base
except ImportError:  # pragma: no cover - no httptools: uvicorn's pure-Python parser
    from uvicorn.protocols.http.h11_impl import H11Protocol as _Base  # type: ignore[assignment]

ENV = "IAPO_CONNECTION_LIMITS"  # JSON of ConnectionLimits for `gateway.connections:Protocol` in spawned workers
HEADROOM = 256  # open files kept back from connections: SQLite files, upstream sockets, logs
LINGER_SECONDS = 1.0  # an answered, closing connection drains input this long so its client reads the answer
LINGER_SLOTS = 64  # refused connections draining at once beyond the cap; more are closed at once
URL_ALLOWANCE = 16_384  # request-line bytes allowed on top of twice the header limit


@dataclasses.dataclass(frozen=True)
class ConnectionLimits:
    """Timeouts in seconds and caps; `max_connections=None` derives the cap from the open-file limit."""

    header_timeout: float = 10.0
    idle_timeout: float = 5.0
    max_connections: int | None = None
    body_timeout: float = 30.0
    max_header_bytes: int = 32_768

    @property
    def head_bound(self) -> int:
        """Raw request-line + header bytes beyond which a connection is cut (the app's 431 check is the precise one)."""
        return 2 * self.max_header_bytes + URL_ALLOWANCE

    @classmethod
    def from_config(cls, limits: Any) -> "ConnectionLimits":
        """From any object with these attribute names (e.g. `Settings.limits`); missing or None keep the defaults."""
        names = (f.name for f in dataclasses.fields(cls))
        return cls(**{n: getattr(limits, n) for n in names if getattr(limits, n, None) is not None})

    @classmethod
    def from_env(cls, environ: Any = os.environ) -> "ConnectionLimits":
        return cls(**json.loads(environ[ENV])) if environ.get(ENV) else cls()


def error_json(message: str, code: str, type: str = "invalid_request_error") -> bytes:
    """An OpenAI-style error body."""
    return json.dumps({"error": {"message": message, "type": type, "code": code, "param": None}}).encode()


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE towards the hard limit (best effort); return the soft limit in force."""
    if resource is None:  # pragma: no cover
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in ([1 << 20, 1 << 16, 10_240] if hard == resource.RLIM_INFINITY else [hard]):
        if soft == resource.RLIM_INFINITY or target <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def default_max_connections(soft_limit: int) -> int:
    """Connections one process may hold: the soft open-file limit less HEADROOM, at least 64."""
    return max(64, (soft_limit if soft_limit >= 0 else 1 << 20) - HEADROOM)


class LimitedHTTPProtocol(_Base):
    """uvicorn's HTTP protocol plus header and idle timeouts, a request-head bound and a connection cap."""

    limits = ConnectionLimits()
    max_connections = default_max_connections(-1)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.limits.idle_timeout  # idle after a response, as before the first request
        self._timer: asyncio.TimerHandle | None = None  # the header deadline, or the end of a linger
        self._waiting = False  # a request line + headers are due
        self._after: Any = None  # the cycle whose end started the wait (None: the connection's start)
        self._got = False  # bytes arrived while waiting
        self._head: int | None = None  # raw bytes of the request head being parsed (httptools callbacks)
        self._discard = False  # answered and closing: input is dropped

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        over = len(self.connections) - self.max_connections  # draining refusals count: they hold a file
        if over > 0:
            self._reject(503, "The server has too many open connections; retry shortly.", "too_many_connections",
                         "server_error", linger=over <= LINGER_SLOTS)
            return
        self.timeout_keep_alive_task = self.loop.call_later(self.limits.idle_timeout, self.timeout_keep_alive_handler)
        self._wait()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._discard:
            return
        self._got = self._got or self._waiting
        super().data_received(data)
        if self.transport.get_protocol() is not self:  # upgraded to a WebSocket
            self._cancel()
            return
        if self._waiting and self.cycle is not self._after:  # the awaited request's headers are complete
            self._waiting = False
            self._cancel()
        if self._head is not None and not self.transport.is_closing():
            self._head += len(data)
            if self._head > self.limits.head_bound:
                self._reject(431, "The request line and headers are too large.", "headers_too_large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head = 0

    def on_headers_complete(self) -> None:
        self._head = None
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._discard and not self.transport.is_closing() and self.cycle.response_complete:
            self._cancel()
            self._wait()  # nothing pipelined: the next request's headers are due within header_timeout

    def _wait(self) -> None:
        self._waiting, self._after, self._got = True, self.cycle, False
        self._timer = self.loop.call_later(self.limits.header_timeout, self._header_timeout)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _header_timeout(self) -> None:
        self._timer = None
        if not self.transport.is_closing() and not self._got:  # idle: close quietly, as keep-alive does
            self.transport.close()
        elif not self.transport.is_closing():
            self._reject(408, f"The request headers did not arrive within {self.limits.header_timeout:g} seconds.",
                         "request_timeout")

    def _reject(self, status: int, message: str, code: str, type: str = "invalid_request_error",
                linger: bool = True) -> None:
        """Answer, half-close, and drop input until the client closes or LINGER_SECONDS pass (not a reset)."""
        self._discard, self._waiting = True, False
        self._cancel()
        self._unset_keepalive_if_required()
        body, retry = error_json(message, code, type), "retry-after: 1\r\n" if status == 503 else ""
        head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n{retry}\r\n")
        self.transport.write(head.encode() + body)
        if not (linger and self.transport.can_write_eof()):
            self.transport.close()
            return
        self.transport.write_eof()
        self._timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)


def protocol_class(limits: ConnectionLimits) -> type:
    """A protocol class enforcing `limits`, for `uvicorn.Config(http=...)` in this process."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0] if resource else -1
    cap = limits.max_connections or default_max_connections(soft)
    return type("LimitedHTTPProtocol", (LimitedHTTPProtocol,), {"limits": limits, "max_connections": cap})


def __getattr__(name: str) -> Any:
    """`gateway.connections:Protocol`, for spawned uvicorn workers: built once from IAPO_CONNECTION_LIMITS."""
    if name != "Protocol":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = globals()["Protocol"] = protocol_class(ConnectionLimits.from_env())
    return cls


def uvicorn_options(limits: ConnectionLimits, workers: int = 1) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.run`/`uvicorn.Config`; with workers > 1 also exports the limits to them."""
    options: dict[str, Any] = {"timeout_keep_alive": limits.idle_timeout,
                               "h11_max_incomplete_event_size": limits.head_bound}
    if workers > 1:  # spawned workers import the protocol by name and read the limits from the environment
        os.environ[ENV] = json.dumps(dataclasses.asdict(limits))
        options["http"] = "gateway.connections:Protocol"
    else:
        options["http"] = protocol_class(limits)
    return options


class BodyRejected(BaseException):
    """Raised from `receive` once BodyLimit has answered; a BaseException so apps' `except Exception` let it by."""


async def _answer(send: Callable, status: int, message: str, code: str) -> None:
    body = error_json(message, code)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class _Guard:
    """One request's counted, timed `receive`, and its `send`, silenced once the guard has answered."""

    def __init__(self, receive: Callable, send: Callable, limit: int | None, timeout: float) -> None:
        self._receive, self._send, self.limit, self.timeout = receive, send, limit, timeout
        self.seen, self.done, self.started, self.answered = 0, False, False, False

    async def receive(self) -> dict:
        if self.done:  # the body is complete: waiting for a disconnect is not a stall
            return await self._receive()
        try:
            async with asyncio.timeout(self.timeout):
                message = await self._receive()
        except TimeoutError:
            await self.fail(408, f"The request body stalled for more than {self.timeout:g} seconds.", "request_timeout")
        if message["type"] != "http.request":
            self.done = True
            return message
        self.seen += len(message.get("body", b""))
        if self.limit is not None and self.seen > self.limit:
            await self.fail(413, f"Request body exceeds the limit of {self.limit} bytes.", "body_too_large")
        self.done = not message.get("more_body", False)
        return message

    async def send(self, message: dict) -> None:
        if not self.answered:
            self.started = self.started or message["type"] == "http.response.start"
            await self._send(message)

    async def fail(self, status: int, message: str, code: str) -> None:
        if not self.started:
            self.answered = True
            await _answer(self._send, status, message, code)
        raise BodyRejected(message)


class BodyLimit:
    """ASGI middleware: 413 past the body limit (before reading, if declared), 408 on a stall, 400 on a bad length."""

    def __init__(self, app: Any, max_body_bytes: int | None | Callable[[], int | None],
                 body_timeout: float | Callable[[], float] = 30.0) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes if callable(max_body_bytes) else (lambda: max_body_bytes)
        self.body_timeout = body_timeout if callable(body_timeout) else (lambda: body_timeout)
        if hasattr(app, "state"):
            self.state = app.state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes()
        declared = {value.strip() for name, value in scope["headers"] if name.lower() == b"content-length"}
        if declared:
            length = declared.pop()
            if declared or not length.isdigit() or len(length) > 18:
                await _answer(send, 400, "The Content-Length header is not a valid length.", "invalid_content_length")
                return
            if limit is not None and int(length) > limit:
                await _answer(send, 413, f"Request body of {int(length)} bytes exceeds the limit of {limit}.",
                              "body_too_large")
                return
        guard = _Guard(receive, send, limit, self.body_timeout())
        try:
            await self.app(scope, guard.receive, guard.send)
        except* BodyRejected:
            pass
