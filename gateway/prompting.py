"""Applying an arm's prompt to a caller's request: messages, and who wins on decoding settings."""
from __future__ import annotations

from gateway.config import Route
from gateway.records import query_key  # noqa: F401  (re-exported for the trainer)

TOKEN_LIMITS = ("max_tokens", "max_completion_tokens")


def render_messages(route: Route, prompt_id: str, messages: list[dict]) -> list[dict]:
    """Apply a prompt: its system text first, its instruction appended to the last user message.

    User content is only concatenated, never formatted, so it cannot inject template syntax.
    """
    prompt = route.prompt(prompt_id)
    out = [dict(m) for m in messages]
    if prompt.instruction:
        last_user = max((i for i, m in enumerate(out) if m.get("role") == "user"), default=None)
        if last_user is not None:
            content = out[last_user].get("content")
            if isinstance(content, list):
                out[last_user]["content"] = content + [{"type": "text", "text": prompt.instruction}]
            else:
                out[last_user]["content"] = f"{content or ''}\n\n{prompt.instruction}"
    if prompt.system:
        out.insert(0, {"role": "system", "content": prompt.system})
    return out


def merge_params(caller: dict, prompt_params: dict, caller_overrides=()) -> tuple[dict, list[str]]:
    """Decoding settings of a routed request, and the caller's fields the arm replaced.

    The arm's settings win (they were learned together with its prompt and N), except for the
    route's `caller_overrides`; a token limit is the smaller of the caller's and the arm's, sent
    under the caller's name for it (`max_tokens` or `max_completion_tokens`).
    """
    params = dict(caller)
    overridden = []
    caller_limit_name = next((k for k in TOKEN_LIMITS if caller.get(k) is not None), None)
    for name, value in prompt_params.items():
        if name in caller_overrides and caller.get(name) is not None:
            continue
        if name in TOKEN_LIMITS:
            if caller_limit_name is None:
                params[name] = value
            elif caller[caller_limit_name] > value:
                params[caller_limit_name] = value
                overridden.append(caller_limit_name)
            continue
        if name in caller and caller[name] != value:
            overridden.append(name)
        params[name] = value
    return params, sorted(set(overridden))


def apply_arm(route: Route, prompt_id: str, caller_body: dict, owned: tuple[str, ...]) -> tuple[dict, list[str]]:
    """The upstream body for a routed request: the caller's fields the gateway does not own, the arm's
    decoding settings by the precedence rule, the prompt applied to the messages."""
    fields = {k: v for k, v in caller_body.items() if k not in owned}
    body, overridden = merge_params(fields, route.prompt(prompt_id).params, route.caller_overrides)
    body["messages"] = render_messages(route, prompt_id, caller_body["messages"])
    return body, overridden
