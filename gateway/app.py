"""The Starlette app: OpenAI-compatible endpoints over the Gateway."""
from __future__ import annotations

import contextlib
import json
import logging
import time

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.config import Settings
from gateway.errors import GatewayError, invalid
from gateway.feedback import record_feedback
from gateway.openapi import openapi_document
from gateway.request import parse_chat_request
from gateway.serving import Gateway, Served

log = logging.getLogger("iapo.app")
CHUNK_CHARS = 48


def create_app(settings: Settings, config_path: str | None = None) -> Starlette:
    gateway = Gateway(settings, config_path)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()
            gateway.metrics.worker_exited()

    async def chat_completions(request: Request) -> Response:
        start = time.perf_counter()
        gateway.metrics.in_flight.inc()
        try:
            caller = gateway.resolve(request.headers.get("authorization"))
            req = parse_chat_request(await request.body(), gateway.settings.limits)
            served = await gateway.chat(req, caller)
        except GatewayError as err:
            return err.response()
        except Exception:
            log.exception("unexpected error serving a chat request")
            return GatewayError(500, "The gateway failed to serve this request.", type="server_error",
                                code="internal_error").response()
        finally:
            gateway.metrics.in_flight.dec()
        overhead_ms = max(0.0, (time.perf_counter() - start - served.upstream_s) * 1000)
        headers = {**served.headers, "x-iapo-overhead-ms": f"{overhead_ms:.2f}"}
        if req.stream:
            return StreamingResponse(_sse(served, req.include_usage), media_type="text/event-stream",
                                     headers={**headers, "cache-control": "no-cache"})
        return JSONResponse(served.body, headers=headers)

    async def models(request: Request) -> Response:
        s = gateway.settings
        data = [{"id": r.model, "object": "model", "created": 0, "owned_by": "iapo"} for r in s.routes]
        data += [{"id": name, "object": "model", "created": 0, "owned_by": "upstream"} for name in s.upstreams]
        return JSONResponse({"object": "list", "data": data})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "policy_version": gateway.policy.version,
                             "log_queue": gateway.writer.depth() if gateway.writer else 0})

    async def metrics(request: Request) -> Response:
        gateway.metrics.log_queue.set(gateway.writer.depth() if gateway.writer else 0)
        return Response(gateway.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def feedback(request: Request) -> Response:
        try:
            caller = gateway.resolve(request.headers.get("authorization"))
            try:
                payload = json.loads(await request.body())
            except ValueError:
                raise invalid("We could not parse the JSON body of your request.", code="invalid_json") from None
            if not isinstance(payload, dict):
                raise invalid("The request body must be a JSON object.", code="invalid_json")
            return JSONResponse(await record_feedback(gateway, payload, caller))
        except GatewayError as err:
            return err.response()

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_document())

    app = Starlette(
        routes=[
            Route("/openapi.json", openapi, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/v1/feedback", feedback, methods=["POST"]),
        ],
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return HeaderLimit(app, lambda: gateway.settings.limits.max_header_bytes)


class HeaderLimit:
    """ASGI middleware: requests whose headers exceed the limit get a 431 before any work is done."""

    def __init__(self, app, limit) -> None:
        self.app, self.limit = app, limit
        self.state = app.state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and sum(len(k) + len(v) for k, v in scope["headers"]) > self.limit():
            response = GatewayError(431, "Request headers are too large.", code="headers_too_large").response()
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def _sse(served: Served, include_usage: bool):
    """The chosen completion as OpenAI chat.completion.chunk events, ending in [DONE]."""
    body = served.body
    base = {"id": body["id"], "object": "chat.completion.chunk", "created": body["created"], "model": body["model"]}

    def event(delta: dict, finish: str | None = None, **extra) -> str:
        chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    yield event({"role": "assistant", "content": ""})
    text = served.text
    for i in range(0, len(text), CHUNK_CHARS):
        yield event({"content": text[i:i + CHUNK_CHARS]})
    yield event({}, served.finish_reason, **({"iapo": body["iapo"]} if "iapo" in body else {}))
    if include_usage:
        yield f"data: {json.dumps({**base, 'choices': [], 'usage': body['usage']})}\n\n"
    yield "data: [DONE]\n\n"
