"""Answer extraction, majority vote and best-of-N selection over N completions."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

# Default: the last \boxed{...} (one level of nested braces), else the last "Final answer: ..." line.
BOXED_PATTERN = r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}"
FINAL_ANSWER_PATTERN = r"[Ff]inal [Aa]nswer(?:\s+is)?\s*[:=]?\s*([^\n]+)"
_SPACES = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Canonical form for voting: trimmed, single-spaced, lower-case, no trailing period or $."""
    text = _SPACES.sub(" ", text.strip()).strip("$ ").rstrip(".").strip()
    return text.lower()


@dataclass(frozen=True)
class AnswerExtractor:
    """Pulls the final answer out of a completion; `None` when it has none.

    With no pattern, reads the last `\\boxed{...}`, else the last `Final answer: ...`; with a
    pattern, its first group (or the whole match) of the last match.
    """

    pattern: str | None = None
    normalize: bool = True

    def __post_init__(self) -> None:
        patterns = [self.pattern] if self.pattern else [BOXED_PATTERN, FINAL_ANSWER_PATTERN]
        object.__setattr__(self, "_regexes", [re.compile(p) for p in patterns])

    def __call__(self, text: str | None) -> str | None:
        if not text:
            return None
        for regex in self._regexes:  # type: ignore[attr-defined]
            last = None
            for last in regex.finditer(text):
                pass
            if last is not None:
                answer = next((g for g in last.groups() if g is not None), last.group(0))
                answer = normalize_answer(answer) if self.normalize else answer.strip()
                return answer or None
        return None


@dataclass(frozen=True)
class Vote:
    """Outcome of a majority vote: chosen completion, its answer, tie size and vote share."""

    index: int
    answer: str | None
    tie_size: int
    vote_share: float


def majority_vote(answers: list[str | None], rng: np.random.Generator) -> Vote:
    """Most frequent non-empty answer; ties broken uniformly at random (tie size recorded)."""
    valid = [a for a in answers if a is not None]
    if not valid:
        return Vote(index=0, answer=None, tie_size=0, vote_share=0.0)
    labels, counts = np.unique(np.array(valid, dtype=str), return_counts=True)
    top = counts.max()
    tied = np.flatnonzero(counts == top)
    winner = str(labels[tied[rng.integers(len(tied))]] if len(tied) > 1 else labels[tied[0]])
    index = next(i for i, a in enumerate(answers) if a == winner)
    return Vote(index=index, answer=winner, tie_size=int(len(tied)), vote_share=float(top) / len(answers))


def best_of_n(scores: np.ndarray, weights: np.ndarray, rng: np.random.Generator) -> int:
    """Index of the completion with the highest weighted score (scores (n, K)); ties at random. A NaN
    score (a reward model's) ranks below every number."""
    total = np.nan_to_num(np.asarray(scores, dtype=float) @ np.asarray(weights, dtype=float), nan=-np.inf)
    best = np.flatnonzero(total >= total.max() - 1e-12)
    return int(best[rng.integers(len(best))]) if len(best) > 1 else int(best[0])


def canonical_tool_calls(calls: list[dict]) -> str:
    """The vote answer of a completion that calls tools: each call's name and parsed arguments, in a
    stable form (argument order and whitespace do not matter; call ids never do)."""
    canon = []
    for call in calls:
        function = call.get("function") or {}
        arguments = function.get("arguments")
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            parsed = arguments  # invalid JSON votes as its literal text
        canon.append([function.get("name"), parsed])
    return json.dumps(canon, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def answer_of(message: dict | None, extract: AnswerExtractor) -> str | None:
    """A completion's vote answer: its tool calls' canonical form, else the answer extracted from its text."""
    if not message:
        return None
    if message.get("tool_calls"):
        return canonical_tool_calls(message["tool_calls"])
    return extract(message.get("content"))
