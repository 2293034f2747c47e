"""Choosing one of a route's N completions: majority vote over answers (or tool calls), or best-of-N
by the tier's weighted scores."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from gateway.config import Route, Tier
from gateway.runtime import Runtime
from gateway.scorers import ScoringSpend
from gateway.upstream import Completion
from policies.aggregate import answer_of, best_of_n, majority_vote

log = logging.getLogger("iapo.aggregate")


@dataclass
class Choice:
    """The chosen completion, every completion's answer and scores, and what the `iapo` object reports."""

    index: int
    answers: list[str | None]
    scores: np.ndarray | None = None
    info: dict = field(default_factory=dict)
    quality: dict[str, float] = field(default_factory=dict)
    scoring_failed: bool = False
    scoring: ScoringSpend = field(default_factory=ScoringSpend)  # what judge calls cost


@dataclass
class WaveScores:
    """Best-of-N drawn in waves: each wave's completions are scored as they arrive (so the request can
    stop once one reaches the tier's threshold), and the vote reuses these scores instead of asking
    the scorers (judges cost money) again."""

    names: list[str]
    rows: list[np.ndarray] = field(default_factory=list)  # (wave size, K) per wave; NaN for failed draws
    spend: ScoringSpend = field(default_factory=ScoringSpend)
    error: str | None = None

    async def add(self, rt: Runtime, route: Route, messages: list[dict],
                  completions: list[Completion]) -> np.ndarray | None:
        """Score one wave; returns its completions' scores (NaN rows for failed draws), or None when a
        scorer failed (kept in `error`)."""
        ok = [i for i, c in enumerate(completions) if not c.error]
        scores = np.full((len(completions), len(self.names)), np.nan)
        if ok:
            try:
                scores[ok] = await rt.scorers[route.model].score(messages, [completions[i].message for i in ok],
                                                                 self.spend)
            except Exception as exc:
                self.error = str(exc)[:200]
                return None
        self.rows.append(scores)
        return scores

    @property
    def scores(self) -> np.ndarray:
        return np.vstack(self.rows) if self.rows else np.zeros((0, len(self.names)))


async def choose(rt: Runtime, route: Route, tier: Tier, messages: list[dict], completions: list[Completion],
                 rng: np.random.Generator, answers: list | None = None, scored: WaveScores | None = None) -> Choice:
    """`answers`: MV answers already extracted (by adaptive waves), one per completion; `scored`:
    best-of-N scores already taken wave by wave."""
    ok = [i for i, c in enumerate(completions) if not c.error]
    n = len(completions)
    if route.aggregator == "mv":
        if answers is None:
            extract = rt.extractors[route.model]
            answers = [answer_of(c.message, extract) if not c.error else None for c in completions]
        vote = majority_vote(answers, rng)
        chosen = vote.index if vote.answer is not None else ok[0]
        share = vote.vote_share * n / len(ok)
        info = {"answer": vote.answer, "tie_size": vote.tie_size, "vote_share": share}
        return Choice(chosen, answers, None, info, {"vote_share": share})
    scorer = rt.scorers[route.model]
    if scored is None:
        scored = WaveScores(scorer.names)
        await scored.add(rt, route, messages, completions)
    scores = scored.scores
    if scored.error is not None or len(scores) != n:
        error = scored.error or "scores are missing for some completions"
        log.warning("scoring failed on route %s: %s", route.model, error)
        return Choice(ok[0], [None] * n, None, {"scoring_error": error}, {}, scoring_failed=True,
                      scoring=scored.spend)
    chosen = ok[best_of_n(scores[ok], rt.weights(route, tier), rng)]
    quality = {name: float(scores[chosen, k]) for k, name in enumerate(scorer.names)}
    return Choice(chosen, [None] * n, scores, {}, quality, scoring=scored.spend)
