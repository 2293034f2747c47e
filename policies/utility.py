"""Per-context utilities of served requests (the paper's R_mv and R_bon), vectorised over contexts."""
from __future__ import annotations

import numpy as np


def mv_credit(counts: np.ndarray, gold_column: int = 0) -> np.ndarray:
    """Credit of a vote from answer counts (..., L): 1/t when gold is among the t tied top answers.

    Column `gold_column` holds the gold answer's count; an empty vote (all counts 0) earns 0.
    """
    counts = np.asarray(counts)
    top = counts.max(axis=-1)
    tied = (counts == top[..., None]).sum(axis=-1)
    wins = (counts[..., gold_column] == top) & (top > 0)
    return np.where(wins, 1.0 / np.maximum(tied, 1), 0.0)


def mv_utility(credit: np.ndarray, cost: np.ndarray, weight: np.ndarray, cost_weight: np.ndarray) -> np.ndarray:
    """`w·credit − λ·cost` for every context: returns (C, ...) from credit/cost (...) and (C,) params."""
    w = np.asarray(weight, dtype=float).reshape((-1,) + (1,) * np.ndim(credit))
    lam = np.asarray(cost_weight, dtype=float).reshape((-1,) + (1,) * np.ndim(cost))
    return w * np.asarray(credit, dtype=float) - lam * np.asarray(cost, dtype=float)


def bon_utility(scores: np.ndarray, costs: np.ndarray, weights: np.ndarray, cost_weights: np.ndarray) -> np.ndarray:
    """`max_i w·s_i − λ·Σ cost_i` per context, from scores (n, K), costs (n,), weights (C, K), λ (C,)."""
    quality = np.asarray(weights, dtype=float) @ np.asarray(scores, dtype=float).T  # (C, n)
    return quality.max(axis=1) - np.asarray(cost_weights, dtype=float) * float(np.sum(costs))


def answers_to_counts(answers: list[str | None], gold: str | None) -> np.ndarray:
    """Vote counts with the gold answer in column 0 and every other answer after it (None dropped)."""
    labels = [a for a in answers if a is not None]
    others = sorted({a for a in labels if a != gold})
    counts = np.zeros(1 + len(others), dtype=np.int64)
    index = {a: i + 1 for i, a in enumerate(others)}
    for a in labels:
        counts[0 if a == gold else index[a]] += 1
    return counts
