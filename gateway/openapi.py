"""The gateway's OpenAPI document, served at /openapi.json: request schemas are generated from the
same pydantic definitions that validate requests (`gateway.request`), so fuzzing tests what is served."""
from __future__ import annotations

from functools import lru_cache

from gateway.request import SCHEMAS

ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type"],
                             "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                            "code": {"type": ["string", "null"]}, "param": {"type": ["string", "null"]}}}},
}
OPERATIONS = {"chat": ("/v1/chat/completions", "createChatCompletion"), "completions": ("/v1/completions", "createCompletion"),
              "embeddings": ("/v1/embeddings", "createEmbedding"), "responses": ("/v1/responses", "createResponse")}
FEEDBACK = {"type": "object", "required": ["id"],
            "properties": {"id": {"type": "string"}, "gold": {"type": "string"}, "score": {"type": "number"},
                           "objective": {"type": "string"}}}


def _json(schema: dict) -> dict:
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict:
    return {str(s): {"description": "OpenAI-style error", **_json(ERROR)} for s in statuses}


def _components() -> tuple[dict, dict]:
    """Each endpoint's request schema and the shared definitions, with refs into components/schemas."""
    schemas, requests = {}, {}
    for endpoint, model in SCHEMAS.items():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        requests[endpoint] = {"$ref": f"#/components/schemas/{model.__name__}"}
    return schemas, requests


ADMIN = {  # path: (method, operationId, summary, body schema or None)
    "/admin/keys": [("get", "adminListKeys", "caller and admin keys (never their secrets)", None),
                    ("post", "adminCreateKey", "create a key; its secret is in this answer only", {
                        "type": "object", "properties": {"tier": {"type": "string"}, "name": {"type": "string"},
                                                         "admin": {"type": "boolean"},
                                                         "models": {"type": "array", "items": {"type": "string"}},
                                                         "caps": {"type": "object"}}})],
    "/admin/keys/{key}/revoke": [("post", "adminRevokeKey", "revoke a key by name or id", None)],
    "/admin/spend": [("get", "adminSpend", "spend against every tier and key cap in its current window", None)],
    "/admin/policies": [("get", "adminPolicyVersions", "policy versions", None)],
    "/admin/policies/diff": [("get", "adminPolicyDiff", "what changed between versions a and b", None)],
    "/admin/policies/rollback": [("post", "adminRollback", "publish a copy of an older version", {
        "type": "object", "required": ["version"], "properties": {"version": {"type": "integer"}}})],
    "/admin/policies/{version}": [("get", "adminPolicy", "one version with each tier's ranked arms", None)],
    "/admin/training/runs": [("get", "adminTrainingRuns", "training runs", None)],
    "/admin/training/runs/{run_id}": [("get", "adminTrainingRun", "one training run and its report", None)],
    "/admin/requests": [("get", "adminRequests", "recent requests (filter by route, tier, status, kind)", None)],
    "/admin/requests/{request_id}": [("get", "adminRequest", "one request with its N completions", None)],
    "/admin/config": [("get", "adminConfig", "the running config, secrets redacted", None)],
    "/admin/actions": [("get", "adminActions", "what each admin key did", None)],
}


def _admin_paths() -> dict:
    paths = {}
    for path, operations in ADMIN.items():
        params = [{"name": p.strip("{}"), "in": "path", "required": True, "schema": {"type": "string"}}
                  for p in path.split("/") if p.startswith("{")]
        paths[path] = {}
        for method, operation, summary, body in operations:
            op = {"operationId": operation, "summary": summary, "security": [{"adminKey": []}],
                  "responses": {"200": {"description": summary, **_json({"type": "object"})},
                                **_errors(400, 401, 403, 404, 409)}}
            if params:
                op["parameters"] = params
            if body:
                op["requestBody"] = {"required": False, **_json(body)}
            paths[path][method] = op
    return paths


@lru_cache(maxsize=1)
def openapi_document() -> dict:
    schemas, requests = _components()
    paths = {}
    for endpoint, (path, operation) in OPERATIONS.items():
        paths[path] = {"post": {
            "operationId": operation,
            "requestBody": {"required": True, **_json(requests[endpoint])},
            "responses": {"200": {"description": "the provider's answer, or SSE events when stream is true",
                                  **_json({"type": "object"})},
                          **_errors(400, 401, 404, 413, 429, 502, 503)}}}
    paths["/v1/models"] = {"get": {"operationId": "listModels", "responses": {
        "200": {"description": "the routes and upstreams this caller may name", **_json({"type": "object"})},
        **_errors(401)}}}
    paths["/v1/models/{model}"] = {"get": {
        "operationId": "retrieveModel",
        "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {"200": {"description": "one model", **_json({"type": "object"})}, **_errors(401, 404)}}}
    paths["/healthz"] = {"get": {"operationId": "health", "responses": {
        "200": {"description": "ok", **_json({"type": "object"})},
        "503": {"description": "the store cannot write", **_json({"type": "object"})}}}}
    paths["/v1/feedback"] = {"post": {
        "operationId": "createFeedback", "requestBody": {"required": True, **_json(FEEDBACK)},
        "responses": {"200": {"description": "recorded", **_json({"type": "object"})}, **_errors(400, 401, 404)}}}
    paths.update(_admin_paths())
    return {
        "openapi": "3.1.0",
        "info": {"title": "iapo-gateway", "version": "0.2.0",
                 "description": "OpenAI-compatible gateway that chooses prompt and N per route and budget tier."},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {
            "adminKey": {"type": "http", "scheme": "bearer", "description": "an admin key (iapo keys create --admin)"},
            "callerKey": {"type": "http", "scheme": "bearer"}}},
    }
