"""OpenAI-style errors: one exception type, mapped to a JSON body in one place."""
from __future__ import annotations

from starlette.responses import JSONResponse


class GatewayError(Exception):
    """An error to return as `{"error": {"message", "type", "code", "param"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, *, param: str | None = None, code: str = "invalid_value") -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def unauthorized(message: str = "Incorrect API key provided.") -> GatewayError:
    return GatewayError(401, message, type="authentication_error", code="invalid_api_key")


def not_found(message: str, *, code: str = "not_found", param: str | None = None) -> GatewayError:
    return GatewayError(404, message, code=code, param=param)


def upstream_failed(message: str) -> GatewayError:
    return GatewayError(502, message, type="upstream_error", code="upstream_failed")
