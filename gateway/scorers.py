"""Best-of-N scorers: one score per completion and objective, normalised to [0, 1]."""
from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Protocol

import httpx
import numpy as np

from gateway.config import Route, Scorer
from gateway.upstream import UpstreamClient
from gateway.worst_case import Bound

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


async def all_settled(calls) -> list:
    """Await every call, then raise the first failure: a paid call (a judge's) still running beside
    a failed one is waited for, so what it cost is booked before the request settles."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    failed = next((r for r in results if isinstance(r, BaseException)), None)
    if failed is not None:
        raise failed
    return results


class ObjectiveScorer(Protocol):
    """Scores every completion of one request for one objective (raw scale)."""

    async def score(self, messages: list[dict], texts: list[str]) -> np.ndarray: ...


def as_output(output: dict | str) -> dict:
    """A completion's message (a bare text is an assistant message with that content)."""
    return output if isinstance(output, dict) else {"role": "assistant", "content": output}


def rendered(output: dict) -> str:
    """What text scorers read: the content, then each tool call as `name(arguments)`."""
    parts = [output.get("content") or ""]
    for call in output.get("tool_calls") or []:
        function = call.get("function") or {}
        parts.append(f"{function.get('name')}({function.get('arguments') or ''})")
    return "\n".join(p for p in parts if p)


class RegexScorer:
    """1 when the completion matches the pattern, else 0."""

    def __init__(self, pattern: str) -> None:
        self.regex = re.compile(pattern)

    async def score(self, messages, texts):
        return np.array([1.0 if self.regex.search(t) else 0.0 for t in texts])


class JsonValidScorer:
    """1 when the completion (code fences stripped) parses as JSON, or when every tool call's arguments
    do, else 0."""

    async def score(self, messages, texts, outputs=None):
        outputs = outputs or [as_output(t) for t in texts]
        return np.array([1.0 if _valid_json(o) else 0.0 for o in outputs])


def _valid_json(output: dict) -> bool:
    calls = output.get("tool_calls") or []
    if calls:
        return all(isinstance((c.get("function") or {}).get("arguments"), str)
                   and _parses(c["function"]["arguments"]) for c in calls)
    return _parses(output.get("content") or "")


def _parses(text: str) -> bool:
    body = text.strip()
    if body.startswith("```"):
        body = body.strip("`").split("\n", 1)[-1]
    try:
        json.loads(body)
        return True
    except ValueError:
        return False


class LengthScorer:
    """1 at the target length in characters, falling linearly to 0 at zero or twice the target."""

    def __init__(self, target_chars: int) -> None:
        self.target = max(1, target_chars)

    async def score(self, messages, texts):
        lengths = np.array([len(t) for t in texts], dtype=float)
        return np.clip(1.0 - np.abs(lengths - self.target) / self.target, 0.0, 1.0)


class HttpRewardScorer:
    """POSTs {prompt, completions} to a reward model; reads `scores[i][field]` per completion."""

    def __init__(self, url: str, field: str, client: httpx.AsyncClient, timeout: float) -> None:
        self.url, self.field, self.client, self.timeout = url, field, client, timeout

    async def score(self, messages, texts):
        payload = await self.fetch(messages, texts)
        return np.array([float(s[self.field]) for s in payload])

    async def fetch(self, messages, texts, outputs=None) -> list[dict]:
        payload = {"prompt": messages, "completions": texts, "messages": outputs or [as_output(t) for t in texts]}
        r = await self.client.post(self.url, json=payload, timeout=self.timeout)
        r.raise_for_status()
        scores = r.json()["scores"]
        if len(scores) != len(texts):
            raise ValueError(f"reward model returned {len(scores)} scores for {len(texts)} completions")
        return scores


@dataclass
class ScoringSpend:
    """What scoring one request cost (judge calls are billed like completions)."""

    dollars: float = 0.0
    tokens: int = 0


JUDGE_MAX_TOKENS = 8


class JudgeScorer:
    """Asks a judge model (any configured upstream) to rate each completion 0-10 against a rubric."""

    def __init__(self, upstream: UpstreamClient, rubric: str) -> None:
        self.upstream, self.rubric = upstream, rubric

    async def score(self, messages, texts, spend: ScoringSpend | None = None):
        question = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), "")
        return np.array(await all_settled([self._rate(str(question), t, spend) for t in texts]))

    def worst_case(self, request_tokens: int) -> float:
        """Bound on one judge call's dollars: the question and the answer (within the request's bound),
        the rubric, and the reply's token limit."""
        prompt = request_tokens + len(self.rubric.encode()) + 96
        return self.upstream.worst_case(Bound(prompt, JUDGE_MAX_TOKENS, 1))[0]

    async def _rate(self, question: str, answer: str, spend: ScoringSpend | None) -> float:
        prompt = [
            {"role": "system", "content": f"You are a strict grader. {self.rubric} Reply with one number from 0 to 10."},
            {"role": "user", "content": f"Question:\n{question}\n\nAnswer:\n{answer}"},
        ]
        body = {"model": self.upstream.config.wire_model, "messages": prompt, "temperature": 0.0,
                "max_tokens": JUDGE_MAX_TOKENS}
        reply, _ = await self.upstream.call("chat", body)
        if spend is not None:
            usage = reply.body.get("usage") if isinstance(reply.body.get("usage"), dict) else {}
            if "completion_tokens" in usage:
                pt, ct = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
                spend.dollars += self.upstream.served_by(reply).price(pt, ct)
                spend.tokens += pt + ct
            else:  # no usage: book the bound
                spend.dollars += self.worst_case(len(json.dumps(prompt).encode()))
        choices = reply.body.get("choices") or [{}]
        match = _NUMBER.search(str((choices[0].get("message") or {}).get("content") or ""))
        return float(match.group(0)) if match else 0.0


class RouteScorer:
    """All objectives of a BoN route; HTTP objectives sharing a URL cost one call."""

    def __init__(self, route: Route, upstreams: dict[str, UpstreamClient], client: httpx.AsyncClient) -> None:
        self.objectives = route.objectives
        self.scorers = [_build(o.scorer, upstreams, client) for o in route.objectives]

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.objectives]

    @property
    def timeout(self) -> float:
        """The longest one scoring can take: an HTTP scorer's timeout, or a judge upstream's whole
        deadline (waiting for a slot, the call, its fallback's)."""
        return max((s.upstream.deadline_s if isinstance(s, JudgeScorer) else o.scorer.timeout
                    for o, s in zip(self.objectives, self.scorers)), default=0.0)

    def worst_case(self, body: dict, request_tokens: int) -> float:
        """Bound on the dollars of scoring one completion of a request bounded by `request_tokens`."""
        return sum(s.worst_case(request_tokens) for s in self.scorers if isinstance(s, JudgeScorer))

    async def score(self, messages: list[dict], outputs: list[dict | str],
                    spend: ScoringSpend | None = None) -> np.ndarray:
        """(n, K) scores in [0, 1] of completions given as messages (tool calls included) or texts;
        judge calls add what they cost to `spend`."""
        outputs = [as_output(o) for o in outputs]
        texts = [rendered(o) for o in outputs]
        columns: list[np.ndarray | None] = [None] * len(self.scorers)
        by_url: dict[str, list[int]] = {}
        for k, s in enumerate(self.scorers):
            if isinstance(s, HttpRewardScorer):
                by_url.setdefault(s.url, []).append(k)
        fetched = await all_settled([self.scorers[ks[0]].fetch(messages, texts, outputs) for ks in by_url.values()])
        for ks, payload in zip(by_url.values(), fetched):
            for k in ks:
                columns[k] = np.array([float(p[self.scorers[k].field]) for p in payload])
        rest = [k for k, c in enumerate(columns) if c is None]
        calls = [self.scorers[k].score(messages, texts, outputs) if isinstance(self.scorers[k], JsonValidScorer)
                 else self.scorers[k].score(messages, texts, spend) if isinstance(self.scorers[k], JudgeScorer)
                 else self.scorers[k].score(messages, texts) for k in rest]
        for k, col in zip(rest, await all_settled(calls)):
            columns[k] = col
        raw = np.stack(columns, axis=1)
        low = np.array([o.low for o in self.objectives])
        high = np.array([o.high for o in self.objectives])
        return np.clip((raw - low) / np.where(high > low, high - low, 1.0), 0.0, 1.0)


def _build(config: Scorer, upstreams: dict[str, UpstreamClient], client: httpx.AsyncClient) -> ObjectiveScorer:
    if config.type == "regex":
        return RegexScorer(config.pattern or ".")
    if config.type == "json":
        return JsonValidScorer()
    if config.type == "length":
        return LengthScorer(config.target_chars or 500)
    if config.type == "http":
        if not config.url or not config.field:
            raise ValueError("an http scorer needs url and field")
        return HttpRewardScorer(config.url, config.field, client, config.timeout)
    if not config.upstream or config.upstream not in upstreams:
        raise ValueError(f"a judge scorer needs an upstream, got {config.upstream!r}")
    return JudgeScorer(upstreams[config.upstream], config.rubric or "Rate how helpful and correct the answer is.")
