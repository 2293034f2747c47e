"""Connection limits under a real uvicorn on loopback: idle floods, slow loris, the connection cap, body limits."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import selectors
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway import connections
from gateway.connections import BodyLimit, ConnectionLimits, raise_open_file_limit, uvicorn_options
from sandbox.servers import free_port

SLACK = 3.0  # generous: a loaded 2-core machine must not flake
ROOT = Path(__file__).resolve().parents[2]


def echo_app(max_body: int = 1_000_000, body_timeout: float = 1.0):
    """An echo endpoint that reads the whole body (and hides its own errors as 500s, like the gateway)."""
    seen = {"calls": 0, "bytes": 0}

    async def echo(request: Request) -> JSONResponse:
        seen["calls"] += 1
        try:
            body = b""
            async for chunk in request.stream():
                body += chunk
                seen["bytes"] = len(body)
        except Exception:
            return JSONResponse({"error": "app failed"}, status_code=500)
        return JSONResponse({"bytes": len(body), "client_port": request.client.port})

    app = BodyLimit(Starlette(routes=[Route("/echo", echo, methods=["GET", "POST"])]), max_body, body_timeout)
    return app, seen


@contextlib.contextmanager
def serve(limits: ConnectionLimits, app=None):
    """uvicorn with `uvicorn_options(limits)` in a daemon thread; yields its base URL."""
    app = app or echo_app()[0]
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                                          access_log=False, **uvicorn_options(limits)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", port
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module", autouse=True)
def open_files():
    raise_open_file_limit()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def read_response(sock: socket.socket, timeout: float = 5.0) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 response with a Content-Length body (or up to EOF)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", -1))
    while length < 0 or len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def error_code(body: bytes) -> str:
    return json.loads(body)["error"]["code"]


def wait_closed(socks: list[socket.socket], deadline: float) -> list[socket.socket]:
    """Read every socket until the server closes it or `deadline`; return those still open."""
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    open_ = set(socks)
    while open_ and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.2):
            try:
                data = key.fileobj.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except ConnectionError:
                data = b""
            if not data or data.startswith(b"HTTP/1.1 408"):
                sel.unregister(key.fileobj)
                open_.discard(key.fileobj)
    sel.close()
    return list(open_)


def test_idle_flood_is_closed_while_a_normal_request_is_served():
    limits = ConnectionLimits(header_timeout=1.0, idle_timeout=1.0)
    with serve(limits) as (url, port):
        start = time.monotonic()
        idle = [connect(port) for _ in range(300)]
        try:
            r = httpx.post(f"{url}/echo", content=b"hello", timeout=5)
            assert r.status_code == 200 and r.json()["bytes"] == 5
            still_open = wait_closed(idle, start + limits.idle_timeout + SLACK)
            assert not still_open, f"{len(still_open)} idle connections outlived idle_timeout + slack"
        finally:
            for s in idle:
                s.close()


def test_slow_loris_is_cut_off_after_header_timeout():
    limits = ConnectionLimits(header_timeout=1.0, idle_timeout=1.0)
    request = b"GET /echo HTTP/1.1\r\nHost: x\r\nUser-Agent: slow-loris\r\nAccept: */*\r\n\r\n"
    with serve(limits) as (_, port):
        sock = connect(port)
        start, answer = time.monotonic(), b""
        try:
            for byte in request:
                sock.sendall(bytes([byte]))
                readable, _, _ = select.select([sock], [], [], 0.3)
                if readable:
                    answer = sock.recv(65536)
                    break
        except ConnectionError:
            pass
        elapsed = time.monotonic() - start
        sock.close()
    assert elapsed < limits.header_timeout + SLACK
    assert elapsed >= limits.header_timeout * 0.5  # it was served the full grace, not refused
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert error_code(answer.partition(b"\r\n\r\n")[2]) == "request_timeout"


@pytest.mark.skipif(connections._Base.__name__ != "HttpToolsProtocol", reason="h11 bounds the head itself (400)")
def test_oversized_request_head_is_cut_off():
    with serve(ConnectionLimits(max_header_bytes=4096)) as (_, port):
        sock = connect(port)
        with contextlib.suppress(ConnectionError):
            sock.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000)
        status, _, body = read_response(sock)
        sock.close()
    assert status == 431 and error_code(body) == "headers_too_large"


def test_connections_beyond_the_cap_get_503_and_those_under_it_are_served():
    limits = ConnectionLimits(header_timeout=10.0, idle_timeout=10.0, max_connections=50)
    with serve(limits) as (url, port):
        socks = [connect(port) for _ in range(80)]
        try:
            refused = []
            for s in socks[50:]:
                status, headers, body = read_response(s)
                assert status == 503 and error_code(body) == "too_many_connections"
                assert headers["content-type"] == "application/json"
                refused.append(s)
            for s in socks[:50]:  # those under the cap are still served
                s.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
                status, _, body = read_response(s)
                assert status == 200, body
        finally:
            for s in socks:
                s.close()
        deadline, status = time.monotonic() + SLACK, None
        while time.monotonic() < deadline and status != 200:  # the server notices the closes
            status = httpx.get(f"{url}/echo", timeout=5).status_code
            time.sleep(0.05)
        assert status == 200


def test_refused_client_that_sends_its_request_reads_the_503():
    with serve(ConnectionLimits(max_connections=1, idle_timeout=10.0, header_timeout=10.0)) as (url, port):
        holder = connect(port)
        time.sleep(0.2)
        with pytest.raises(httpx.HTTPStatusError) as info:
            httpx.post(f"{url}/echo", content=b"x" * 10_000, timeout=5).raise_for_status()
        holder.close()
    assert info.value.response.status_code == 503
    assert info.value.response.json()["error"]["code"] == "too_many_connections"


def test_declared_oversized_body_gets_413_before_it_is_sent():
    app, seen = echo_app(max_body=1_000_000)
    with serve(ConnectionLimits(), app) as (_, port):
        sock = connect(port)
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
        status, headers, body = read_response(sock)
        sock.close()
    assert status == 413 and error_code(body) == "body_too_large"
    assert headers["connection"] == "close"
    assert seen["calls"] == 0


def test_chunked_body_over_the_limit_gets_413_and_the_app_sees_at_most_the_limit():
    app, seen = echo_app(max_body=1000)
    with serve(ConnectionLimits(), app) as (_, port):
        sock = connect(port)
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            for _ in range(10):
                sock.sendall(b"12c\r\n" + b"a" * 300 + b"\r\n")
                time.sleep(0.05)
        status, _, body = read_response(sock)
        sock.close()
    assert status == 413 and error_code(body) == "body_too_large"
    assert seen["calls"] == 1 and seen["bytes"] <= 1000


def test_body_within_the_limit_is_echoed_chunked_or_not():
    app, _ = echo_app(max_body=1000)
    with serve(ConnectionLimits(), app) as (url, _):
        assert httpx.post(f"{url}/echo", content=b"a" * 1000, timeout=5).json()["bytes"] == 1000
        assert httpx.post(f"{url}/echo", content=iter([b"a" * 600, b"b" * 400]), timeout=5).json()["bytes"] == 1000


def test_stalled_body_gets_408():
    app, _ = echo_app(body_timeout=1.0)
    with serve(ConnectionLimits(), app) as (_, port):
        sock = connect(port)
        start = time.monotonic()
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"a" * 10)
        status, _, body = read_response(sock, timeout=1.0 + SLACK)
        sock.close()
    assert status == 408 and error_code(body) == "request_timeout"
    assert time.monotonic() - start < 1.0 + SLACK


@pytest.mark.parametrize("length", [b"12abc", b"-5"])
def test_malformed_content_length_gets_400(length):
    with serve(ConnectionLimits()) as (_, port):  # uvicorn's parser refuses it first, with a 400 of its own
        sock = connect(port)
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: " + length + b"\r\n\r\n")
        assert read_response(sock)[0] == 400
        sock.close()


@pytest.mark.parametrize("headers", [[(b"content-length", b"12abc")], [(b"content-length", b"5"),
                                                                        (b"content-length", b"6")]])
def test_body_limit_refuses_a_malformed_content_length_itself(headers):
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    app, seen = echo_app()
    asyncio.run(app({"type": "http", "method": "POST", "path": "/echo", "headers": headers}, receive, send))
    assert sent[0]["status"] == 400 and error_code(sent[1]["body"]) == "invalid_content_length"
    assert seen["calls"] == 0


def test_keep_alive_reuses_one_connection():
    with serve(ConnectionLimits(header_timeout=1.0, idle_timeout=1.0)) as (url, _):
        with httpx.Client(timeout=5) as client:
            ports = {client.post(f"{url}/echo", content=b"x").json()["client_port"] for _ in range(20)}
    assert len(ports) == 1


WORKER_SCRIPT = textwrap.dedent("""
    import sys, uvicorn
    from gateway.connections import ConnectionLimits, uvicorn_options
    limits = ConnectionLimits(header_timeout=1.0, idle_timeout=1.0)
    uvicorn.run("tests.gateway.test_connections:worker_app", host="127.0.0.1", port=int(sys.argv[1]), workers=2,
                log_level="warning", **uvicorn_options(limits, workers=2))
""")


async def worker_app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def test_limits_reach_spawned_workers():
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT, str(port)], cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/", timeout=2).text == "ok"
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "workers did not start"
                time.sleep(0.1)
        idle = [connect(port) for _ in range(20)]
        assert not wait_closed(idle, time.monotonic() + 1.0 + SLACK)
        for s in idle:
            s.close()
    finally:
        proc.terminate()
        proc.wait(10)
