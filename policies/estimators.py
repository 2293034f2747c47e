"""Arm-value estimates from pulls: direct, disjoint blocks (the paper), or all-subsets (ours).

A pull of (p, N) on one query holds samples of every arm (p, n ≤ N): the paper splits it into
⌊N/n⌋ disjoint blocks; averaging over many n-subsets uses the same completions with less variance
(for Best-of-N exactly, as a U-statistic of the sorted scores; for majority vote over random
permutations). Every pull also gives a sample for every context: only weights and λ differ.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from math import comb

import numpy as np

from policies.utility import mv_credit

MODES = ("direct", "block", "subset")


@lru_cache(maxsize=None)
def block_index(N: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint blocks of every size n ≤ N: (starts, ends, segment start per n, block count per n)."""
    starts, ends, seg, per_n = [], [], [], []
    for n in range(1, N + 1):
        k = N // n
        seg.append(len(starts))
        per_n.append(k)
        starts.extend(range(0, k * n, n))
        ends.extend(range(n, k * n + 1, n))
    return np.array(starts), np.array(ends), np.array(seg), np.array(per_n)


@lru_cache(maxsize=None)
def max_of_subset_weights(N: int) -> np.ndarray:
    """A[n−1, i] = P(the i-th smallest of N values is the max of a random n-subset) = C(i, n−1)/C(N, n)."""
    A = np.zeros((N, N))
    for n in range(1, N + 1):
        total = comb(N, n)
        A[n - 1] = [comb(i, n - 1) / total for i in range(N)]
    return A


def standard_error(sums: np.ndarray, squares: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Standard error of a mean from running Σx, Σx² and the sample count (NaN below two samples)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.maximum(squares / count - (sums / count) ** 2, 0.0) * count / np.maximum(count - 1, 1)
        return np.where(count > 1, np.sqrt(var / count), np.nan)


def encode_answers(answers, gold) -> np.ndarray:
    """Answer codes for one pull: 0 = gold, 1.. = each other answer, −1 = no answer.

    Integer arrays are taken as class labels with −1 for "no answer" (fast path for simulators).
    """
    if isinstance(answers, np.ndarray) and answers.dtype.kind in "iu":
        return np.where(answers < 0, -1, np.where(answers == gold, 0, answers + 1))
    labels = np.array(["" if a is None else str(a) for a in answers], dtype=str)
    _, inverse = np.unique(labels, return_inverse=True)
    codes = inverse + 1
    codes[labels == ("" if gold is None else str(gold))] = 0
    codes[labels == ""] = -1
    return codes


@dataclass
class ArmEstimates:
    """Running sums of utility per (context, prompt, n) and sample weights per (prompt, n)."""

    weights: np.ndarray  # (C, K) objective weights per context
    cost_weights: np.ndarray  # (C,)
    n_prompts: int
    n_max: int
    mode: str = "subset"
    permutations: int = 8
    rng: np.random.Generator | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        C = len(self.cost_weights)
        self.sums = np.zeros((C, self.n_prompts, self.n_max))
        self.counts = np.zeros((self.n_prompts, self.n_max))
        # per-pull means, for standard errors: Σ u, Σ u², number of pulls
        self.pull_sums = np.zeros((C, self.n_prompts, self.n_max))
        self.pull_squares = np.zeros((C, self.n_prompts, self.n_max))
        self.pulls = np.zeros((self.n_prompts, self.n_max))
        self.rng = self.rng or np.random.default_rng(0)

    def mean(self) -> np.ndarray:
        """(C, P, n_max) estimated values; NaN where an arm has no sample."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.counts > 0, self.sums / self.counts, np.nan)

    def stderr(self) -> np.ndarray:
        """(C, P, n_max) standard error of each estimate from the spread of per-pull means."""
        return standard_error(self.pull_sums, self.pull_squares, self.pulls)

    def _record_pulls(self, prompt: int, per_pull: np.ndarray) -> None:
        """per_pull (C, Q, N): each pull's mean utility at every scale n ≤ N."""
        N = per_pull.shape[2]
        self.pull_sums[:, prompt, :N] += per_pull.sum(axis=1)
        self.pull_squares[:, prompt, :N] += (per_pull**2).sum(axis=1)
        self.pulls[prompt, :N] += per_pull.shape[1]

    def add_mv(self, prompt: int, codes: np.ndarray, costs: np.ndarray) -> None:
        """Q pulls of one prompt at one N: codes (Q, N) from encode_answers, costs (Q, N)."""
        Q, N = codes.shape
        if self.mode == "direct":
            credit = mv_credit(_counts(codes[:, None, :]))[:, 0]  # (Q,)
            self._add_direct(prompt, N, self.weights[:, 0, None] * credit - self.cost_weights[:, None] * costs.sum(1))
            return
        R = self.permutations if self.mode == "subset" else 1
        if R > 1:
            order = np.argsort(self.rng.random((Q, R, N)), axis=-1)
            codes_r = np.take_along_axis(np.broadcast_to(codes[:, None, :], (Q, R, N)), order, axis=-1)
            costs_r = np.take_along_axis(np.broadcast_to(costs[:, None, :], (Q, R, N)), order, axis=-1)
        else:
            codes_r, costs_r = codes[:, None, :], costs[:, None, :]
        starts, ends, seg, per_n = block_index(N)
        L = max(int(codes.max()) + 1, 1)
        onehot = (codes_r[..., None] == np.arange(L)).astype(np.int32)  # (Q, R, N, L)
        cum = np.concatenate([np.zeros((Q, R, 1, L), np.int32), np.cumsum(onehot, axis=2)], axis=2)
        credit = mv_credit(cum[:, :, ends] - cum[:, :, starts])  # (Q, R, B)
        cost_cum = np.concatenate([np.zeros((Q, R, 1)), np.cumsum(costs_r, axis=2)], axis=2)
        block_cost = cost_cum[:, :, ends] - cost_cum[:, :, starts]
        credit_qn = np.add.reduceat(credit.sum(axis=1), seg, axis=1) / R  # (Q, N): summed over blocks of size n
        cost_qn = np.add.reduceat(block_cost.sum(axis=1), seg, axis=1) / R
        utility = self.weights[:, :1, None] * credit_qn - self.cost_weights[:, None, None] * cost_qn  # (C, Q, N)
        self.sums[:, prompt, :N] += utility.sum(axis=1)
        self.counts[prompt, :N] += Q * per_n
        self._record_pulls(prompt, utility / per_n)

    def add_bon(self, prompt: int, scores: np.ndarray, costs: np.ndarray) -> None:
        """Q pulls of one prompt at one N: scores (Q, N, K), costs (Q, N)."""
        Q, N, _ = scores.shape
        u = np.einsum("qnk,ck->cqn", scores, self.weights)  # (C, Q, N)
        if self.mode == "direct":
            self._add_direct(prompt, N, u.max(axis=2) - self.cost_weights[:, None] * costs.sum(1))
            return
        per_n = N // np.arange(1, N + 1)
        if self.mode == "subset":
            quality = np.sort(u, axis=2) @ max_of_subset_weights(N).T  # (C, Q, n): E[max of random n-subset]
        else:
            quality = np.stack([u[:, :, : (N // n) * n].reshape(u.shape[0], Q, N // n, n).max(-1).mean(axis=2)
                                for n in range(1, N + 1)], axis=2)  # (C, Q, n): mean over disjoint blocks
        cost = costs.mean(axis=1)[:, None] * np.arange(1, N + 1)  # (Q, n)
        utility = quality - self.cost_weights[:, None, None] * cost  # (C, Q, N): per-pull means
        self.sums[:, prompt, :N] += (utility * per_n).sum(axis=1)
        self.counts[prompt, :N] += Q * per_n
        self._record_pulls(prompt, utility)

    def _add_direct(self, prompt: int, N: int, utilities: np.ndarray) -> None:
        self.sums[:, prompt, N - 1] += utilities.sum(axis=1)
        self.counts[prompt, N - 1] += utilities.shape[1]
        self.pull_sums[:, prompt, N - 1] += utilities.sum(axis=1)
        self.pull_squares[:, prompt, N - 1] += (utilities**2).sum(axis=1)
        self.pulls[prompt, N - 1] += utilities.shape[1]


def _counts(codes: np.ndarray) -> np.ndarray:
    L = max(int(codes.max()) + 1, 1)
    return (codes[..., None] == np.arange(L)).sum(axis=-2)
