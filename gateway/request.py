"""Request bodies of the OpenAI endpoints: one set of definitions validates them and documents them.

The pydantic models below only *check* a body; what reaches an upstream is the caller's own JSON
(fields the gateway does not own pass through unchanged). `/openapi.json` is generated from the
same models, so what the fuzzer is told is what the parser accepts.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.config import Limits
from gateway.errors import GatewayError, invalid

ENDPOINTS = ("chat", "completions", "embeddings", "responses")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class _Open(BaseModel):
    """Known fields are type-checked strictly; unknown ones are allowed and forwarded as sent."""

    model_config = ConfigDict(extra="allow", strict=True)


class ContentPart(_Open):
    type: str


class ChatMessage(_Open):
    role: Literal["system", "user", "assistant", "tool", "developer", "function"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content_required(self) -> "ChatMessage":
        if self.content is None and self.role in ("system", "user", "developer"):
            raise ValueError("content is required for this role")
        return self


class StreamOptions(_Open):
    include_usage: bool | None = None


Stop = Union[str, Annotated[list[str], Field(max_length=4)], None]


class ChatRequest(_Open):
    """POST /v1/chat/completions."""

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=128)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: Stop = None
    seed: int | None = None
    user: str | None = None
    response_format: dict[str, Any] | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None


class CompletionRequest(_Open):
    """POST /v1/completions (legacy text completions)."""

    model: str = Field(min_length=1)
    prompt: Union[str, list[str], list[int], list[list[int]]]
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=128)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    stop: Stop = None


class EmbeddingRequest(_Open):
    """POST /v1/embeddings."""

    model: str = Field(min_length=1)
    input: Union[str, list[str], list[int], list[list[int]]]
    dimensions: int | None = Field(None, ge=1)
    encoding_format: Literal["float", "base64"] | None = None


class ResponsesRequest(_Open):
    """POST /v1/responses."""

    model: str = Field(min_length=1)
    input: Union[str, list[dict[str, Any]], None] = None
    stream: bool | None = False
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)


SCHEMAS: dict[str, type[_Open]] = {"chat": ChatRequest, "completions": CompletionRequest,
                                   "embeddings": EmbeddingRequest, "responses": ResponsesRequest}
TOKEN_LIMITS = {"chat": ("max_tokens", "max_completion_tokens"), "completions": ("max_tokens",),
                "responses": ("max_output_tokens",), "embeddings": ()}


@dataclass
class ApiCall:
    """A validated request: the caller's body as sent, and what the gateway reads from it."""

    endpoint: str
    body: dict
    model: str
    stream: bool = False
    include_usage: bool = False
    n: int = 1

    @property
    def messages(self) -> list[dict]:
        return self.body.get("messages") or []


def parse_call(endpoint: str, raw: bytes, limits: Limits) -> ApiCall:
    """Validate a body for `endpoint`; raise a 4xx GatewayError naming the offending parameter."""
    if len(raw) > limits.max_body_bytes:
        raise GatewayError(413, f"Request body of {len(raw)} bytes exceeds the limit of {limits.max_body_bytes}.",
                           code="body_too_large")
    body = _load_json(raw, limits)
    try:
        SCHEMAS[endpoint].model_validate(body)
    except ValidationError as exc:
        raise _as_invalid(exc) from None
    if endpoint == "chat" and len(body["messages"]) > limits.max_messages:
        raise invalid(f"'messages' has {len(body['messages'])} items; the limit is {limits.max_messages}.",
                      param="messages", code="array_above_max_length")
    for name in TOKEN_LIMITS[endpoint]:
        value = body.get(name)
        if value is not None and value > limits.max_tokens:
            raise invalid(f"Invalid value for '{name}': expected an integer from 1 to {limits.max_tokens}.", param=name)
    streams = endpoint in ("chat", "completions", "responses")  # the others have no `stream` field
    options = body.get("stream_options") if endpoint in ("chat", "completions") else None
    n = body.get("n") if endpoint in ("chat", "completions") else None
    return ApiCall(endpoint=endpoint, body=body, model=body["model"], stream=streams and body.get("stream") is True,
                   include_usage=isinstance(options, dict) and options.get("include_usage") is True, n=n or 1)


def _load_json(raw: bytes, limits: Limits) -> dict:
    try:
        body = json.loads(raw)
    except RecursionError:
        raise invalid(f"The JSON body nests deeper than {limits.max_json_depth} levels.", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"We could not parse the JSON body of your request: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.", code="invalid_json")
    if _depth_exceeds(body, limits.max_json_depth):
        raise invalid(f"The JSON body nests deeper than {limits.max_json_depth} levels.", code="invalid_json")
    if _SURROGATE_ESCAPE.search(raw):  # a lone surrogate parses, then fails every encoder downstream
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise invalid("The JSON body contains an unpaired UTF-16 surrogate (\\ud800-\\udfff): not valid Unicode.",
                          code="invalid_json") from None
    return body


def _depth_exceeds(value: Any, limit: int) -> bool:
    """True when containers nest deeper than `limit` (iterative: no recursion on hostile input)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def _as_invalid(exc: ValidationError) -> GatewayError:
    """The first validation problem as OpenAI's 400, e.g. `Invalid type for 'messages[0].content'`."""
    error = exc.errors(include_url=False)[0]
    param = _param(error["loc"])
    kind = error["type"]
    if kind == "missing":
        return invalid(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if kind.endswith("_type") or kind in ("model_type", "dict_type", "list_type", "union_tag_invalid"):
        return invalid(f"Invalid type for '{param}': {error['msg']}.", param=param, code="invalid_type")
    if kind == "too_short" and param == "messages":
        return invalid("'messages' must contain at least one message.", param=param, code="empty_array")
    return invalid(f"Invalid value for '{param}': {error['msg']}.", param=param or None)


def _param(loc: tuple) -> str:
    """('messages', 0, 'role') -> 'messages[0].role', dropping pydantic's union-branch labels."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and (part in ("str", "int", "float", "bool", "none") or part.startswith(("list[", "dict[", "constrained-"))
                                        or part[:1].isupper() or part.startswith("function-")):
            continue
        else:
            out += f".{part}" if out else part
    return out
