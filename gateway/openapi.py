"""The gateway's own OpenAPI document, served at /openapi.json (used by API fuzzing)."""
from __future__ import annotations

ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type"],
                             "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                            "code": {"type": ["string", "null"]}, "param": {"type": ["string", "null"]}}}},
}
MESSAGE = {
    "type": "object", "required": ["role"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "user", "assistant", "tool", "developer"]},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {
            "type": "object", "required": ["type"], "properties": {"type": {"type": "string"}, "text": {"type": "string"}}}}]},
        "name": {"type": "string"},
    },
}
CHAT_REQUEST = {
    "type": "object", "required": ["model", "messages"],
    "properties": {
        "model": {"type": "string", "minLength": 1},
        "messages": {"type": "array", "minItems": 1, "items": MESSAGE},
        "stream": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 1, "maximum": 128},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "max_tokens": {"type": "integer", "minimum": 1},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}]},
        "seed": {"type": "integer"},
        "user": {"type": "string"},
    },
}


def _json(schema: dict) -> dict:
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict:
    return {str(s): {"description": "OpenAI-style error", **_json(ERROR)} for s in statuses}


def openapi_document() -> dict:
    return {
        "openapi": "3.1.0",
        "info": {"title": "iapo-gateway", "version": "0.1.0",
                 "description": "OpenAI-compatible gateway that chooses prompt and N per route and budget tier."},
        "paths": {
            "/v1/chat/completions": {"post": {
                "operationId": "createChatCompletion",
                "requestBody": {"required": True, **_json(CHAT_REQUEST)},
                "responses": {"200": {"description": "chat.completion, or SSE chunks when stream is true",
                                      **_json({"type": "object"})},
                              **_errors(400, 401, 404, 413, 429, 502)}}},
            "/v1/models": {"get": {"operationId": "listModels",
                                   "responses": {"200": {"description": "routes and upstreams", **_json({"type": "object"})}}}},
            "/healthz": {"get": {"operationId": "health", "responses": {"200": {"description": "ok", **_json({"type": "object"})}}}},
            "/v1/feedback": {"post": {
                "operationId": "createFeedback",
                "requestBody": {"required": True, **_json({
                    "type": "object", "required": ["id"],
                    "properties": {"id": {"type": "string"}, "gold": {"type": "string"}, "score": {"type": "number"},
                                   "objective": {"type": "string"}}})},
                "responses": {"200": {"description": "recorded", **_json({"type": "object"})}, **_errors(400, 401, 404)}}},
        },
    }
