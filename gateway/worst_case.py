"""Upper bounds on what one request can be billed for, read from its body: caps reserve them, cost
clamps divide by them, training's feasible arms use them. A bound that is not a bound lets a caller
spend past a cap, so each piece errs on the high side."""
from __future__ import annotations

from dataclasses import dataclass

# Any BPE token is at least one byte, so a text's UTF-8 length bounds its tokens; media parts are
# billed by their content, not their URL's length, so each counts a fixed allowance instead.
MEDIA_ALLOWANCE = {"image_url": 2_000, "input_image": 2_000, "input_audio": 20_000, "file": 50_000,
                   "input_file": 50_000}
PER_MESSAGE = 8  # role markers and separators a provider adds around each message
TOKEN_LIMIT_FIELDS = {"chat": ("max_tokens", "max_completion_tokens"), "completions": ("max_tokens",),
                      "responses": ("max_output_tokens",), "embeddings": ()}
INJECTED_LIMIT_FIELD = {"chat": "max_completion_tokens", "completions": "max_tokens", "responses": "max_output_tokens"}


@dataclass(frozen=True)
class Bound:
    """One request at most: `completions` completions of at most `completion_tokens` tokens each, after a
    prompt of at most `prompt_tokens` (counted again for each completion: n > 1 never bills less)."""

    prompt_tokens: int
    completion_tokens: int
    completions: int

    @property
    def tokens_per_completion(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def prompt_tokens(payload) -> int:
    """Bound on the prompt tokens of everything in `payload` (messages, tools, input, instructions)."""
    total, stack = 0, [payload]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item.encode("utf-8", "replace"))
        elif isinstance(item, dict):
            if item.get("type") in MEDIA_ALLOWANCE:
                total += MEDIA_ALLOWANCE[item["type"]]
                continue
            if "role" in item:
                total += PER_MESSAGE
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif item is not None:
            total += len(str(item))
    return total + PER_MESSAGE


def token_limit(endpoint: str, body: dict) -> int | None:
    """The largest completion-token limit the body sets (a provider may honour either of two fields)."""
    limits = [body[k] for k in TOKEN_LIMIT_FIELDS[endpoint] if isinstance(body.get(k), int) and body[k] > 0]
    return max(limits) if limits else None


def completions_of(endpoint: str, body: dict) -> int:
    """How many completions the body asks for: n; for legacy completions, per prompt and best_of."""
    n = body.get("n") if isinstance(body.get("n"), int) else 1
    if endpoint == "completions":
        prompt = body.get("prompt")
        prompts = len(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else 1
        best_of = body.get("best_of") if isinstance(body.get("best_of"), int) else 1
        return prompts * max(n, best_of, 1)
    if endpoint in ("responses", "embeddings"):
        return 1
    return max(n, 1)


def bound(endpoint: str, body: dict, default_limit: int) -> Bound:
    payload = {k: v for k, v in body.items() if k not in ("model", "stream", "stream_options")}
    limit = 0 if endpoint == "embeddings" else (token_limit(endpoint, body) or default_limit)
    return Bound(prompt_tokens(payload), limit, completions_of(endpoint, body))
