"""Recorded or synthetic answer distributions, their samplers and their exact arm values.

The replay upstream serves these, the benchmark simulates pulls from them, and both judge policies
by exact values computed here (no sampling noise in the yardstick).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MVEnvironment:
    """Majority-vote task: P(answer class | prompt, query), the gold class, cost per completion."""

    name: str
    answer_probs: np.ndarray  # (P, X, C)
    gold: np.ndarray  # (X,)
    cost: np.ndarray  # (P,)
    tier_names: tuple[str, ...] = ("low", "mid", "high")
    tier_cost_weight: tuple[float, ...] = (0.0, 0.2, 1.0)
    n_max: int = 32

    @property
    def n_prompts(self) -> int:
        return self.answer_probs.shape[0]

    @property
    def n_queries(self) -> int:
        return self.answer_probs.shape[1]

    def sample(self, prompt: int, query: int, n: int, rng: np.random.Generator) -> np.ndarray:
        """n answer classes drawn i.i.d. for (prompt, query)."""
        cdf = np.cumsum(self.answer_probs[prompt, query])
        return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(cdf) - 1)

    def sample_many(self, prompts: np.ndarray, queries: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        """(Q, n) answer classes for Q pulls at once."""
        cdf = np.cumsum(self.answer_probs[prompts, queries], axis=-1)  # (Q, C)
        u = rng.random((len(prompts), n, 1))
        return np.minimum((u > cdf[:, None, :]).sum(-1), cdf.shape[-1] - 1)

    def credit(self) -> np.ndarray:
        """Exact expected vote credit (ties split) for every (prompt, query, n): (P, X, n_max)."""
        P, X, C = self.answer_probs.shape
        flat = self.answer_probs.reshape(P * X, C)
        gold = np.tile(self.gold, P)
        return mv_vote_credit(flat, gold, self.n_max).reshape(P, X, self.n_max)

    @classmethod
    def load(cls, path: str) -> "MVEnvironment":
        d = np.load(path)
        return cls(
            name=str(d["name"]), answer_probs=d["answer_probs"], gold=d["gold"],
            cost=d["cost_per_completion"], tier_names=tuple(str(t) for t in d["tier_names"]),
            tier_cost_weight=tuple(float(w) for w in d["tier_cost_weight"]), n_max=int(d["n_max"]),
        )


def mv_vote_credit(probs: np.ndarray, gold: np.ndarray, n_max: int) -> np.ndarray:
    """E[1[gold among top]/t] of a vote over n i.i.d. draws, n = 1..n_max, exactly: (B, n_max).

    Generating functions over the other classes' counts: for each gold count g, the product over
    classes j of (Σ_{k<g} (b_j z)^k/k! + y (b_j z)^g/g!) gives, at z^{n−g} y^s, the mass of votes
    where s other classes tie gold; each such vote credits 1/(1+s).
    """
    probs = np.asarray(probs, dtype=float)
    B, C = probs.shape
    a = probs[np.arange(B), gold]
    others = _others(probs, gold)  # (B, C-1)
    fact = np.array([math.factorial(i) for i in range(n_max + 1)], dtype=float)
    tie_weight = 1.0 / (1.0 + np.arange(C))
    credit = np.zeros((B, n_max))
    powers = others[:, :, None] ** np.arange(n_max + 1)[None, None, :] / fact  # (B, C-1, n_max+1)
    for g in range(1, n_max + 1):
        D = n_max - g
        poly = np.zeros((B, D + 1, C))
        poly[:, 0, 0] = 1.0
        for j in range(C - 1):
            new = np.zeros_like(poly)
            for k in range(min(g - 1, D) + 1):
                new[:, k:, :] += poly[:, : D + 1 - k, :] * powers[:, j, k, None, None]
            if g <= D:
                new[:, g:, 1:] += poly[:, : D + 1 - g, :-1] * powers[:, j, g, None, None]
            poly = new
        n = np.arange(g, n_max + 1)
        scale = (fact[n] / fact[g])[None, :] * (a ** g)[:, None]
        credit[:, g - 1:] += scale * (poly @ tie_weight)
    return credit


def _others(probs: np.ndarray, gold: np.ndarray) -> np.ndarray:
    B, C = probs.shape
    mask = np.ones((B, C), dtype=bool)
    mask[np.arange(B), gold] = False
    return probs[mask].reshape(B, C - 1)


@dataclass(frozen=True)
class BoNEnvironment:
    """Best-of-N task: each completion is one of M outcomes with K objective scores in [0, 1]."""

    name: str
    outcome_probs: np.ndarray  # (P, X, M)
    outcome_scores: np.ndarray  # (P, X, M, K)
    cost: np.ndarray  # (P,)
    objectives: tuple[str, ...] = ("helpful", "harmless")
    n_max: int = 32

    @property
    def n_prompts(self) -> int:
        return self.outcome_probs.shape[0]

    @property
    def n_queries(self) -> int:
        return self.outcome_probs.shape[1]

    def sample(self, prompt: int, query: int, n: int, rng: np.random.Generator) -> np.ndarray:
        cdf = np.cumsum(self.outcome_probs[prompt, query])
        return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(cdf) - 1)

    def sample_many(self, prompts: np.ndarray, queries: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        cdf = np.cumsum(self.outcome_probs[prompts, queries], axis=-1)
        u = rng.random((len(prompts), n, 1))
        return np.minimum((u > cdf[:, None, :]).sum(-1), cdf.shape[-1] - 1)

    def expected_max(self, weights: np.ndarray) -> np.ndarray:
        """E[max_i w·s_i] over n i.i.d. completions, exactly: (C, P, X, n_max) for weights (C, K)."""
        u = np.einsum("pxmk,ck->cpxm", self.outcome_scores, np.asarray(weights, dtype=float))
        order = np.argsort(u, axis=-1)
        u_sorted = np.take_along_axis(u, order, axis=-1)
        p_sorted = np.take_along_axis(np.broadcast_to(self.outcome_probs, u.shape), order, axis=-1)
        cdf = np.clip(np.cumsum(p_sorted, axis=-1), 0.0, 1.0)
        prev = np.concatenate([np.zeros(cdf.shape[:-1] + (1,)), cdf[..., :-1]], axis=-1)
        n = np.arange(1, self.n_max + 1)
        mass = cdf[..., None] ** n - prev[..., None] ** n  # (C, P, X, M, n)
        return np.einsum("cpxm,cpxmn->cpxn", u_sorted, mass)


def synthetic_mv(seed: int = 0, n_prompts: int = 12, n_queries: int = 200, n_classes: int = 5,
                 n_deceptive: int = 3) -> MVEnvironment:
    """A seeded MV task with steady prompts and "deceptive" ones that lead at N=1 but not when voted.

    Steady prompts are right with a moderate probability on every query (voting lifts them);
    deceptive prompts are near-certain on most queries and confidently wrong on the rest, so their
    mean at N=1 is higher but voting cannot repair the queries they get wrong.
    """
    rng = np.random.default_rng(seed)
    P, X, C = n_prompts, n_queries, n_classes
    p_gold = np.empty((P, X))
    difficulty = rng.beta(2, 2, size=X)
    for p in range(P):
        if p < n_deceptive:
            easy = rng.random(X) < 0.70 + 0.03 * p
            p_gold[p] = np.where(easy, rng.uniform(0.85, 0.99, X), rng.uniform(0.02, 0.12, X))
        else:
            skill = rng.uniform(0.40, 0.62)
            p_gold[p] = np.clip(skill + 0.25 * (0.5 - difficulty) + rng.normal(0, 0.05, X), 0.05, 0.97)
    gold = rng.integers(C, size=X)
    probs = np.empty((P, X, C))
    for p in range(P):
        wrong = rng.dirichlet(np.full(C - 1, 0.6), size=X)
        # a deceptive prompt's wrong mass concentrates on one class, so it outvotes gold when wrong
        if p < n_deceptive:
            wrong = rng.dirichlet(np.array([8.0] + [0.5] * (C - 2)), size=X)
        rest = (1 - p_gold[p])[:, None] * wrong
        for x in range(X):
            others = [c for c in range(C) if c != gold[x]]
            probs[p, x, others] = rest[x]
            probs[p, x, gold[x]] = p_gold[p, x]
    cost = rng.uniform(0.005, 0.010, size=P)
    return MVEnvironment(name=f"synthetic-mv-{seed}", answer_probs=probs, gold=gold, cost=cost)


def synthetic_bon(seed: int = 0, n_prompts: int = 10, n_queries: int = 150, n_outcomes: int = 6,
                  n_deceptive: int = 2) -> BoNEnvironment:
    """A seeded two-objective BoN task; "deceptive" prompts have a higher mean but little spread,
    so best-of-N favours the more varied prompts once N grows."""
    rng = np.random.default_rng(seed)
    P, X, M, K = n_prompts, n_queries, n_outcomes, 2
    query_offset = rng.normal(0, 0.08, size=(1, X, 1, K))
    mean = np.empty((P, 1, 1, K))
    spread = np.empty((P, 1, 1, 1))
    for p in range(P):
        if p < n_deceptive:
            mean[p] = rng.uniform(0.60, 0.64, size=K)
            spread[p] = 0.02
        else:
            mean[p] = rng.uniform(0.42, 0.56, size=K)
            spread[p] = rng.uniform(0.15, 0.25)
    scores = np.clip(mean + query_offset + spread * rng.normal(size=(P, X, M, K)), 0.0, 1.0)
    probs = rng.dirichlet(np.full(M, 2.0), size=(P, X))
    cost = rng.uniform(0.005, 0.010, size=P)
    return BoNEnvironment(name=f"synthetic-bon-{seed}", outcome_probs=probs, outcome_scores=scores, cost=cost)


def bon_contexts(levels: tuple[float, ...] = (0.0, 0.2, 1.0)) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The paper's 27 BoN contexts: 3 budget levels × weights w1 ∈ {0.1..0.9}, w2 = 1 − w1."""
    w1 = np.round(np.arange(1, 10) / 10, 1)
    weights = np.array([[w, 1 - w] for _ in levels for w in w1])
    lambdas = np.array([lam for lam in levels for _ in w1])
    names = [f"l{lam:g}-w{w:g}" for lam in levels for w in w1]
    return weights, lambdas, names
