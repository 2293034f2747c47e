"""The Starlette app: OpenAI-compatible endpoints over the pipeline; domain errors become responses here."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.access import Access
from gateway.admin import admin_routes
from gateway.config import Settings
from gateway.connections import BodyLimit
from gateway.errors import GatewayError, internal_error, invalid, not_found
from gateway.feedback import record_feedback
from gateway.openai_wire import error_body, model_list, model_object
from gateway.openapi import openapi_document
from gateway.pipeline import Outcome
from gateway.service import GatewayService
from gateway.ui import ui_routes

log = logging.getLogger("iapo.app")


def error_response(err: GatewayError) -> JSONResponse:
    return JSONResponse(error_body(err), status_code=err.status, headers=err.headers)


def outcome_response(outcome: Outcome) -> Response:
    if outcome.stream is not None:
        return StreamingResponse(outcome.stream, media_type="text/event-stream", headers=outcome.headers)
    if isinstance(outcome.body, bytes):
        return Response(outcome.body, status_code=outcome.status, media_type="application/json",
                        headers=outcome.headers)
    return JSONResponse(outcome.body, status_code=outcome.status, headers=outcome.headers)


def create_app(settings: Settings, config_path: str | None = None) -> Starlette:
    service = GatewayService(settings, config_path)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.start()
        try:
            yield
        finally:
            await service.stop()
            service.metrics.worker_exited()

    def api(endpoint: str):
        async def handler(request: Request) -> Response:
            try:
                outcome = await service.pipeline.handle(endpoint, await request.body(),
                                                        request.headers.get("authorization"))
            except GatewayError as err:
                return error_response(err)
            return outcome_response(outcome)
        return handler

    async def models(request: Request) -> Response:
        try:
            caller = service.access.resolve(request.headers.get("authorization"), service.rt)
        except GatewayError as err:
            return error_response(err)
        return JSONResponse(model_list([model_object(m, "iapo" if kind == "route" else "upstream")
                                        for m, kind in Access.visible_models(caller, service.rt)]))

    async def model(request: Request) -> Response:
        model_id = request.path_params["model"]
        try:
            caller = service.access.resolve(request.headers.get("authorization"), service.rt)
            target = Access.authorise(caller, model_id, service.rt)
        except GatewayError as err:
            return error_response(err)
        return JSONResponse(model_object(target.name, "iapo" if target.kind == "route" else "upstream"))

    async def healthz(request: Request) -> Response:
        """200 while requests are admitted ("degraded" when the store fails but `buffer` has room), else 503."""
        if not service.writer:
            return JSONResponse({"status": "starting"}, status_code=503)
        store = service.store_health()
        serving = service.serving()
        status = "ok" if store["state"] == "ok" else "degraded" if serving else "unavailable"
        return JSONResponse({"status": status, "policy_version": service.policy.version, "store": store,
                             "log_queue": store.get("queue", 0)}, status_code=200 if serving else 503)

    async def metrics(request: Request) -> Response:
        if service.writer:
            service.observe_store()
        # spend gauges read the ledger: off the event loop, so a slow store never stalls serving
        return Response(await asyncio.to_thread(service.metrics.render), media_type=CONTENT_TYPE_LATEST)

    async def feedback(request: Request) -> Response:
        try:
            caller = service.access.resolve(request.headers.get("authorization"), service.rt)
            try:
                payload = json.loads(await request.body())
            except (ValueError, RecursionError):
                raise invalid("We could not parse the JSON body of your request.", code="invalid_json") from None
            if not isinstance(payload, dict):
                raise invalid("The request body must be a JSON object.", code="invalid_json")
            return JSONResponse(await record_feedback(service, payload, caller))
        except GatewayError as err:
            return error_response(err)

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_document())

    async def unknown_path(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 405:
            err = GatewayError(405, f"Method {request.method} is not allowed on {request.url.path}.",
                               code="method_not_allowed")
        else:
            err = not_found(f"Unknown request URL: {request.method} {request.url.path}.", code="unknown_url")
        return error_response(err)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s", request.url.path)
        return error_response(internal_error())

    app = Starlette(
        routes=[
            Route("/openapi.json", openapi, methods=["GET"]),
            Route("/v1/chat/completions", api("chat"), methods=["POST"]),
            Route("/chat/completions", api("chat"), methods=["POST"]),
            Route("/v1/completions", api("completions"), methods=["POST"]),
            Route("/completions", api("completions"), methods=["POST"]),
            Route("/v1/embeddings", api("embeddings"), methods=["POST"]),
            Route("/embeddings", api("embeddings"), methods=["POST"]),
            Route("/v1/responses", api("responses"), methods=["POST"]),
            Route("/responses", api("responses"), methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/models", models, methods=["GET"]),
            Route("/v1/models/{model:path}", model, methods=["GET"]),
            Route("/models/{model:path}", model, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/v1/feedback", feedback, methods=["POST"]),
            *admin_routes(service),
            *ui_routes(service),
        ],
        exception_handlers={HTTPException: unknown_path, Exception: unexpected},
        lifespan=lifespan,
    )
    app.router.redirect_slashes = False  # a redirect built from the Host header helps nobody here
    app.state.gateway = service
    limits = lambda: service.settings.limits  # noqa: E731  (read per request: a reload applies at once)
    return BodyLimit(HeaderLimit(app, lambda: limits().max_header_bytes),
                     lambda: limits().max_body_bytes, lambda: limits().body_timeout)


class HeaderLimit:
    """ASGI middleware: requests whose headers exceed the limit get a 431 before any work is done."""

    def __init__(self, app, limit) -> None:
        self.app, self.limit = app, limit
        self.state = app.state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and sum(len(k) + len(v) for k, v in scope["headers"]) > self.limit():
            await error_response(GatewayError(431, "Request headers are too large.", code="headers_too_large"))(
                scope, receive, send)
            return
        await self.app(scope, receive, send)
