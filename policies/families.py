"""A family of majority-vote test environments that do not share MATH's shape.

PSST's choices (pull sizes, rounds, screening, estimator) should follow from the number of prompts,
the budget and what it observes, not from constants tuned on one recorded task. This module makes
tasks that differ where it matters: 10–100 prompts, 2–10 answer classes, gaps between the best
prompts from tiny to large, deceptive prompts (confident: ahead at N = 1, behind once voted),
queries of mixed difficulty (easy, contested, confidently wrong), and resamples of a recorded task
(subsets of its prompts and queries). Every member is an `MVEnvironment`, so its arm values are
exact (`MVEnvironment.credit`, generating functions), never sampled.

Model of one synthetic task: query x has an easiness β_x drawn from a mixture (easy / contested /
hard: the model is confidently wrong), prompt p a skill α_p, and their pair an interaction ε_px;
P(gold | p, x) = σ(α_p + κ_p (β_x + ε_px)), where κ_p = 1 for ordinary prompts and larger for
deceptive ones (more confident either way). The wrong mass follows a per-query distractor profile
(shared by the prompts, as a tempting wrong answer is a property of the question) with per-prompt
noise. Deceptive prompts' wrong mass concentrates on one distractor, so voting cannot repair them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policies.environments import MVEnvironment

__all__ = ["FamilySpec", "synthetic_family_mv", "resample_mv", "heldout_like", "sigmoid", "skill_for_accuracy"]


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


@dataclass(frozen=True)
class FamilySpec:
    """Parameters of one synthetic MV task (see the module docstring for the model).

    mix: fractions of easy / contested / hard queries; easy β ~ N(easy_mean, 1), contested
    β ~ N(0, 1), hard β ~ N(hard_mean, 1). accuracy: the ordinary prompts' single-shot accuracy
    range (their skills α are solved for it); gap: the skill spread, in logits, of the best prompts
    (the top prompt is `gap` above the second, geometric below). interaction: sd of ε_px (how much
    per-query rankings of prompts disagree). deceptive: how many prompts are confident (κ =
    `confidence`) with a single-shot accuracy at the top of the range. distractor: Dirichlet
    concentration of the per-query distractor profile (small: one tempting wrong answer).
    """

    n_prompts: int = 24
    n_queries: int = 400
    n_classes: int = 4
    mix: tuple[float, float, float] = (0.5, 0.35, 0.15)
    easy_mean: float = 3.0
    hard_mean: float = -2.0
    accuracy: tuple[float, float] = (0.55, 0.75)
    gap: float = 0.15
    interaction: float = 0.6
    deceptive: int = 0
    confidence: float = 2.5
    distractor: float = 0.5
    prompt_noise: float = 8.0


def skill_for_accuracy(target: np.ndarray, beta: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """α with mean_x σ(α + scale·β_x) = target, per target (bisection, vectorised)."""
    lo, hi = np.full(len(target), -15.0), np.full(len(target), 15.0)
    for _ in range(60):
        mid = (lo + hi) / 2
        acc = sigmoid(mid[:, None] + scale * beta[None, :]).mean(axis=1)
        lo, hi = np.where(acc < target, mid, lo), np.where(acc < target, hi, mid)
    return (lo + hi) / 2


def _spread(rng: np.random.Generator, spec: FamilySpec) -> np.ndarray:
    """Ordinary prompts' target accuracies: the top two `gap`-close (in logits), the rest spread."""
    P = spec.n_prompts - spec.deceptive
    lo, hi = spec.accuracy
    logit_hi, logit_lo = np.log(hi / (1 - hi)), np.log(lo / (1 - lo))
    steps = spec.gap * 1.3 ** np.arange(max(P - 1, 0))  # gaps grow down the ranking
    logits = logit_hi - np.concatenate([[0.0], np.cumsum(steps)])
    logits = np.maximum(logits, logit_lo + rng.uniform(-0.3, 0.3, size=P))  # the tail fills the range
    return sigmoid(rng.permutation(logits))


def synthetic_family_mv(spec: FamilySpec, seed: int = 0, name: str | None = None) -> MVEnvironment:
    """One seeded task of the family (see FamilySpec)."""
    rng = np.random.default_rng(seed)
    P, X, C, D = spec.n_prompts, spec.n_queries, spec.n_classes, spec.deceptive
    kind = rng.choice(3, size=X, p=np.asarray(spec.mix) / np.sum(spec.mix))
    beta = np.where(kind == 0, rng.normal(spec.easy_mean, 1.0, X),
                    np.where(kind == 1, rng.normal(0.0, 1.0, X), rng.normal(spec.hard_mean, 1.0, X)))
    eps = rng.normal(0.0, spec.interaction, size=(P, X))
    kappa = np.ones(P)
    kappa[:D] = spec.confidence
    ordinary = _spread(rng, spec)
    # deceptive prompts lead at N = 1: accuracy at the top of the range or a little above it
    fooling = np.clip(spec.accuracy[1] + rng.uniform(0.0, 0.06, size=D), 0.02, 0.97)
    target = np.concatenate([fooling, ordinary])
    alpha = np.concatenate([skill_for_accuracy(target[:D], beta, spec.confidence),
                            skill_for_accuracy(target[D:], beta)])
    p_gold = sigmoid(alpha[:, None] + kappa[:, None] * (beta[None, :] + eps))
    # wrong mass: per-query distractor profile shared by prompts, per-prompt noise around it
    profile = rng.dirichlet(np.full(C - 1, spec.distractor), size=X) if C > 2 else np.ones((X, 1))
    if C > 2:
        wrong = rng.gamma(spec.prompt_noise * profile[None] + 1e-3, size=(P, X, C - 1))
        wrong[:D] = rng.gamma(spec.prompt_noise * 4 * _peaked(profile)[None] + 1e-3, size=(D, X, C - 1))
        wrong /= wrong.sum(axis=2, keepdims=True)
    else:
        wrong = np.ones((P, X, 1))
    gold = rng.integers(C, size=X)
    probs = np.empty((P, X, C))
    others = np.array([[c for c in range(C) if c != g] for g in gold])  # (X, C-1)
    probs[:, np.arange(X)[:, None], others] = (1 - p_gold)[:, :, None] * wrong
    probs[:, np.arange(X), gold] = p_gold
    order = rng.permutation(P)  # deceptive prompts are not the first ids
    cost = rng.uniform(0.005, 0.010, size=P)
    return MVEnvironment(name=name or f"family-{seed}", answer_probs=probs[order], gold=gold, cost=cost)


def _peaked(profile: np.ndarray) -> np.ndarray:
    """A profile with (almost) all mass on its largest distractor."""
    out = np.full_like(profile, 0.02)
    out[np.arange(len(profile)), profile.argmax(axis=1)] = 1.0
    return out / out.sum(axis=1, keepdims=True)


def resample_mv(env: MVEnvironment, seed: int, n_prompts: int | None = None, n_queries: int | None = None,
                name: str | None = None) -> MVEnvironment:
    """A recorded task on a random subset of its prompts and of its queries (without replacement)."""
    rng = np.random.default_rng(seed)
    P = min(n_prompts or env.n_prompts, env.n_prompts)
    X = min(n_queries or env.n_queries, env.n_queries)
    prompts = np.sort(rng.choice(env.n_prompts, size=P, replace=False))
    queries = np.sort(rng.choice(env.n_queries, size=X, replace=False))
    return MVEnvironment(name=name or f"{env.name}-P{P}-X{X}-s{seed}", answer_probs=env.answer_probs[prompts][:, queries],
                         gold=env.gold[queries], cost=env.cost[prompts], tier_names=env.tier_names,
                         tier_cost_weight=env.tier_cost_weight, n_max=env.n_max)


def heldout_like(seed: int = 0) -> MVEnvironment:
    """A stand-in for the shape of the held-back set we do not have: 48 prompts, 1,500 four-option
    questions, most easy, some the model gets confidently wrong, prompts 0.55–0.80 at N = 1 with
    the best few close together, and two confident prompts. Not a target to tune on alone."""
    spec = FamilySpec(n_prompts=48, n_queries=1500, n_classes=4, mix=(0.55, 0.30, 0.15), easy_mean=3.5,
                      hard_mean=-2.5, accuracy=(0.55, 0.80), gap=0.04, interaction=0.7, deceptive=2)
    return synthetic_family_mv(spec, seed=seed, name=f"heldout-like-{seed}")
