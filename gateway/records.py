"""The log's row shapes, built in one place for served, forwarded and exploration requests alike."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

from gateway.upstream import Completion
from store.writer import RequestLog


def query_key(payload) -> str:
    """Stable identity of a caller's query (its messages or input), for deduplicating training queries."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:32]


@dataclass
class RequestRecord:
    """One row of `requests`: what was asked, how it was served, what it cost and what the caller got."""

    id: str
    created: float
    kind: str  # serve | proxy | explore
    endpoint: str = "chat"
    route: str | None = None
    tier: str | None = None
    key_id: str | None = None
    upstream: str | None = None
    policy_version: int | None = None
    prompt_id: str | None = None
    prompt_version: str | None = None
    n: int | None = None
    aggregator: str | None = None
    messages: str | None = None
    query_key: str | None = None
    chosen_index: int | None = None
    chosen_answer: str | None = None
    tie_size: int | None = None
    vote_share: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    latency_s: float | None = None
    upstream_latency_s: float | None = None
    upstream_id: str | None = None
    failed: int = 0
    status: int | None = None
    error: str | None = None
    run_id: str | None = None
    run_pull: int | None = None  # an exploration pull's position in its run (resume replays by it)
    waves: int | None = None  # an adaptive request's waves (it may stop before drawing all n)

    def add_usage(self, completions: list[Completion]) -> None:
        self.prompt_tokens = sum(c.prompt_tokens for c in completions)
        self.completion_tokens = sum(c.completion_tokens for c in completions)
        self.cost = float(sum(c.cost for c in completions))
        self.failed = sum(1 for c in completions if c.error)


def completion_rows(request_id: str, completions: list[Completion], answers: list | None = None,
                    scores=None) -> list[dict]:
    """Rows of `completions`: the text (or the whole message when it called tools), answer, scores, usage."""
    rows = []
    for i, c in enumerate(completions):
        text = c.text
        if c.tool_calls or (c.message or {}).get("refusal"):
            text = json.dumps(c.message, ensure_ascii=False)
        row_scores = None
        if scores is not None:
            row_scores = json.dumps([None if math.isnan(v) else float(v) for v in scores[i]])
        rows.append({"request_id": request_id, "idx": i, "text": text, "answer": answers[i] if answers else None,
                     "scores": row_scores, "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                     "cost": c.cost, "finish_reason": c.finish_reason, "latency_s": c.latency_s, "error": c.error})
    return rows


def request_log(record: RequestRecord, completions: list[Completion], answers: list | None = None,
                scores=None) -> RequestLog:
    return RequestLog(asdict(record), completion_rows(record.id, completions, answers, scores))
