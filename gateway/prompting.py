"""Applying a prompt to a caller's messages, and the identity of a query."""
from __future__ import annotations

import hashlib
import json

from gateway.config import Route


def query_key(messages: list[dict]) -> str:
    """Stable identity of a caller's query (its messages), for deduplicating training queries."""
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:32]


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


def merge_params(caller: dict, prompt_params: dict) -> dict:
    """The arm's decoding settings win; a caller's smaller max_tokens is honoured."""
    params = {**caller, **prompt_params}
    for name in ("max_tokens", "max_completion_tokens"):
        if name in caller and name in prompt_params:
            params[name] = min(caller[name], prompt_params[name])
    return params
