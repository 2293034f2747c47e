"""Parsing and validating an OpenAI chat request body into a plain value."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from gateway.config import Limits
from gateway.errors import GatewayError, invalid

ROLES = {"system", "user", "assistant", "tool", "developer", "function"}
NUMERIC = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0), "presence_penalty": (-2.0, 2.0),
           "frequency_penalty": (-2.0, 2.0)}
PASSTHROUGH = {"temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed",
               "presence_penalty", "frequency_penalty", "user", "response_format", "logit_bias",
               "tools", "tool_choice"}


@dataclass
class ChatRequest:
    model: str
    messages: list[dict]
    stream: bool = False
    n: int = 1
    params: dict[str, Any] = field(default_factory=dict)
    include_usage: bool = False


def parse_chat_request(raw: bytes, limits: Limits) -> ChatRequest:
    """Validate the body; raise a 400 GatewayError naming the offending parameter."""
    if len(raw) > limits.max_body_bytes:
        raise GatewayError(413, f"Request body of {len(raw)} bytes exceeds the limit of {limits.max_body_bytes}.",
                           code="body_too_large")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"We could not parse the JSON body of your request: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("you must provide a model parameter", param="model", code="missing_required_parameter")
    messages = body.get("messages")
    if messages is None:
        raise invalid("Missing required parameter: 'messages'.", param="messages", code="missing_required_parameter")
    if not isinstance(messages, list):
        raise invalid("Invalid type for 'messages': expected an array.", param="messages", code="invalid_type")
    if not messages:
        raise invalid("'messages' must contain at least one message.", param="messages", code="empty_array")
    if len(messages) > limits.max_messages:
        raise invalid(f"'messages' has {len(messages)} items; the limit is {limits.max_messages}.", param="messages",
                      code="array_above_max_length")
    for i, m in enumerate(messages):
        _check_message(i, m)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("Invalid type for 'stream': expected a boolean.", param="stream", code="invalid_type")
    n = body.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n > 128:
        raise invalid("Invalid value for 'n': expected an integer from 1 to 128.", param="n")
    params = {k: body[k] for k in PASSTHROUGH if body.get(k) is not None}
    for name, (lo, hi) in NUMERIC.items():
        if name in params:
            v = params[name]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                raise invalid(f"Invalid value for '{name}': expected a number from {lo} to {hi}.", param=name)
    for name in ("max_tokens", "max_completion_tokens"):
        if name in params:
            v = params[name]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v > limits.max_tokens:
                raise invalid(f"Invalid value for '{name}': expected an integer from 1 to {limits.max_tokens}.",
                              param=name)
    _check_passthrough(params)
    options = body.get("stream_options") or {}
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    return ChatRequest(model=model, messages=messages, stream=stream, n=n, params=params, include_usage=include_usage)


def _check_message(i: int, m: Any) -> None:
    if not isinstance(m, dict):
        raise invalid(f"Invalid type for 'messages[{i}]': expected an object.", param=f"messages[{i}]",
                      code="invalid_type")
    role = m.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise invalid(f"Invalid value for 'messages[{i}].role': expected one of {sorted(ROLES)}.",
                      param=f"messages[{i}].role")
    content = m.get("content")
    if content is None and role not in {"assistant", "tool", "function"}:
        raise invalid(f"Missing required parameter: 'messages[{i}].content'.", param=f"messages[{i}].content",
                      code="missing_required_parameter")
    if content is not None and not isinstance(content, (str, list)):
        raise invalid(f"Invalid type for 'messages[{i}].content': expected a string or an array of parts.",
                      param=f"messages[{i}].content", code="invalid_type")
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise invalid(f"Invalid type for 'messages[{i}].content[{j}]': expected an object with a type.",
                              param=f"messages[{i}].content[{j}]", code="invalid_type")


def _check_passthrough(params: dict) -> None:
    """Types of the parameters passed on to the upstream, so a bad one is a 400 here, not an upstream 5xx."""
    stop = params.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and len(stop) <= 4
                                                            and all(isinstance(s, str) for s in stop))):
        raise invalid("Invalid value for 'stop': expected a string or up to 4 strings.", param="stop")
    checks = {"seed": int, "user": str, "response_format": dict, "logit_bias": dict, "tools": list}
    for name, kind in checks.items():
        value = params.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            raise invalid(f"Invalid type for '{name}': expected {kind.__name__}.", param=name, code="invalid_type")
    choice = params.get("tool_choice")
    if choice is not None and not isinstance(choice, (str, dict)):
        raise invalid("Invalid type for 'tool_choice'.", param="tool_choice", code="invalid_type")
