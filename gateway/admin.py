"""The admin API under /admin/: the console library over HTTP, for admin keys only (401 anonymous, 403 a
caller's key). Every action is recorded with the admin key's name; errors are OpenAI-style."""
from __future__ import annotations

import json
import logging

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway import console
from gateway.errors import GatewayError, invalid
from gateway.openai_wire import error_body
from store.keys import KeyStore
from store.policy_store import PolicyStore
from store.spend import SpendLedger
from store.training_runs import TrainingRuns

log = logging.getLogger("iapo.admin")


def admin_routes(service) -> list[Route]:
    """Routes over the running service (its store connection, its access checks)."""

    def handler(fn, *, action: str | None = None):
        async def endpoint(request: Request) -> Response:
            try:
                admin = service.access.admin(request.headers.get("authorization"), service.rt)
                body = await _json(request) if request.method == "POST" else {}
                result, target = fn(request, admin, body)
                if action:
                    console.record_action(service.db, admin.name, action, target, body | {"path": request.url.path})
                    log.info("admin %s: %s %s", admin.name, action, target)
                return JSONResponse(result)
            except GatewayError as err:
                return JSONResponse(error_body(err), status_code=err.status, headers=err.headers)
            except console.ConsoleError as exc:
                err = GatewayError(exc.status, str(exc), code=exc.code)
                return JSONResponse(error_body(err), status_code=err.status)
        return endpoint

    keys = lambda: KeyStore(service.db)  # noqa: E731
    policies = lambda: PolicyStore(service.db)  # noqa: E731

    def list_keys(request, admin, body):
        return {"object": "list", "data": [k.public() for k in keys().list()]}, None

    def create_key(request, admin, body):
        secret, record = console.create_key(keys(), service.settings, tier=body.get("tier"), name=body.get("name"),
                                            admin=bool(body.get("admin")), models=body.get("models"),
                                            caps=body.get("caps"))
        return {**record.public(), "key": secret}, record.name

    def revoke(request, admin, body):
        revoked = console.revoke_key(keys(), request.path_params["key"])
        service.access.clear()
        return {"revoked": revoked}, request.path_params["key"]

    def spend(request, admin, body):
        ledger = SpendLedger(service.db)
        return {"object": "list", "data": console.spend_report(ledger, service.settings, keys())}, None

    def versions(request, admin, body):
        return {"object": "list", "latest": policies().latest_version(),
                "data": console.policy_versions(policies())}, None

    def version(request, admin, body):
        raw = request.path_params["version"]
        return console.policy_view(policies(), None if raw == "latest" else _int(raw, "version")), None

    def diff(request, admin, body):
        a, b = _int(request.query_params.get("a"), "a"), _int(request.query_params.get("b"), "b")
        return {"a": a, "b": b, "changes": console.policy_diff(policies(), a, b)}, None

    def rollback(request, admin, body):
        to = _int(body.get("version"), "version")
        new = console.rollback(policies(), to)
        return {"version": new, "copy_of": to}, f"policy version {to}"

    def runs(request, admin, body):
        route = request.query_params.get("route")
        return {"object": "list", "data": console.training_runs(TrainingRuns(service.db), route)}, None

    def run(request, admin, body):
        return console.training_run(TrainingRuns(service.db), request.path_params["run_id"]), None

    def requests(request, admin, body):
        q = request.query_params
        status = _int(q.get("status"), "status") if q.get("status") else None
        limit = _int(q.get("limit") or "50", "limit")
        return {"object": "list", "data": console.recent_requests(service.db, route=q.get("route"), tier=q.get("tier"),
                                                                  status=status, kind=q.get("kind"), limit=limit)}, None

    def request_detail(request, admin, body):
        return console.request_detail(service.db, request.path_params["request_id"]), None

    def config(request, admin, body):
        return console.config_view(service.settings), None

    def actions(request, admin, body):
        return {"object": "list", "data": console.admin_actions(service.db)}, None

    return [
        Route("/admin/keys", handler(list_keys), methods=["GET"]),
        Route("/admin/keys", handler(create_key, action="key.create"), methods=["POST"]),
        Route("/admin/keys/{key}/revoke", handler(revoke, action="key.revoke"), methods=["POST"]),
        Route("/admin/spend", handler(spend), methods=["GET"]),
        Route("/admin/policies", handler(versions), methods=["GET"]),
        Route("/admin/policies/diff", handler(diff), methods=["GET"]),
        Route("/admin/policies/rollback", handler(rollback, action="policy.rollback"), methods=["POST"]),
        Route("/admin/policies/{version}", handler(version), methods=["GET"]),
        Route("/admin/training/runs", handler(runs), methods=["GET"]),
        Route("/admin/training/runs/{run_id}", handler(run), methods=["GET"]),
        Route("/admin/requests", handler(requests), methods=["GET"]),
        Route("/admin/requests/{request_id}", handler(request_detail), methods=["GET"]),
        Route("/admin/config", handler(config), methods=["GET"]),
        Route("/admin/actions", handler(actions), methods=["GET"]),
    ]


async def _json(request: Request) -> dict:
    raw = await request.body()
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise invalid("We could not parse the JSON body of your request.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.", code="invalid_json")
    return body


def _int(value, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise invalid(f"'{name}' must be an integer.", param=name) from None

