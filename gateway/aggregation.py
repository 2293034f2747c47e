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


async def choose(rt: Runtime, route: Route, tier: Tier, messages: list[dict], completions: list[Completion],
                 rng: np.random.Generator, answers: list | None = None) -> Choice:
    """`answers`: MV answers already extracted (by adaptive waves), one per completion."""
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
    spend = ScoringSpend()
    try:
        ok_scores = await scorer.score(messages, [completions[i].message for i in ok], spend)
    except Exception as exc:
        log.warning("scoring failed on route %s: %s", route.model, exc)
        return Choice(ok[0], [None] * n, None, {"scoring_error": str(exc)[:200]}, {}, scoring_failed=True,
                      scoring=spend)
    scores = np.full((n, len(scorer.names)), np.nan)
    scores[ok] = ok_scores
    chosen = ok[best_of_n(ok_scores, rt.weights(route, tier), rng)]
    quality = {name: float(scores[chosen, k]) for k, name in enumerate(scorer.names)}
    return Choice(chosen, [None] * n, scores, {}, quality, scoring=spend)
