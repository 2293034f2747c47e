"""The gateway's domain errors: each carries the HTTP status and OpenAI error fields it maps to.

Pure values: the HTTP edge (`gateway.app`) turns them into responses through `gateway.openai_wire`.
"""
from __future__ import annotations


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


class UpstreamRejected(GatewayError):
    """The upstream refused a forwarded request itself (a 4xx): its status and error body go back as they are."""

    def __init__(self, status: int, body: dict | None, message: str) -> None:
        super().__init__(status, message, code="upstream_rejected")
        self.body = body


def invalid(message: str, *, param: str | None = None, code: str = "invalid_value") -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def unauthorized(message: str = "Incorrect API key provided.", code: str = "invalid_api_key") -> GatewayError:
    return GatewayError(401, message, type="authentication_error", code=code)


def not_found(message: str, *, code: str = "not_found", param: str | None = None) -> GatewayError:
    return GatewayError(404, message, code=code, param=param)


def model_not_found(model: str) -> GatewayError:
    return not_found(f"The model `{model}` does not exist or you do not have access to it.",
                     code="model_not_found", param="model")


def upstream_failed(message: str) -> GatewayError:
    return GatewayError(502, message, type="upstream_error", code="upstream_failed")


def store_unavailable(message: str) -> GatewayError:
    return GatewayError(503, message, type="server_error", code="store_unavailable", headers={"retry-after": "5"})


def internal_error() -> GatewayError:
    return GatewayError(500, "The gateway failed to serve this request.", type="server_error", code="internal_error")
