"""Baselines behind PSST's ask/tell interface, for the benchmark.

- `Uniform`: every arm (p, n) pulled in turn until the budget runs out; direct estimates only.
- `SequentialHalving`: PSST's rounds and halving, but every active arm is pulled directly
  (no nested reuse across scales) — the generic bandit the paper compares against.
- `UCB`: per context, the arm with the highest mean + c·sqrt(ln t / pulls); direct estimates.
- `PromptThenN`: choose the prompt at N=1 with half the budget, then tune N for it.
"""
from __future__ import annotations

import math

import numpy as np

from policies.psst import Engine


class Uniform(Engine):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("estimator", "direct")
        super().__init__(*args, **kwargs)

    def _plan(self):
        p_idx, n_idx = np.nonzero(self.active.any(axis=0))  # arms feasible in some context
        arms = [(int(p), int(n) + 1) for p, n in zip(p_idx, n_idx)]
        order = self.rng.permutation(len(arms))
        left, plan = self.budget - self.spent, []
        while True:
            added = False
            for i in order:
                p, n = arms[i]
                if n <= left:
                    plan.append((p, n, 1))
                    left -= n
                    added = True
            if not added:
                break
        return plan

    def _end_round(self) -> None:
        self.finished = True


class SequentialHalving(Engine):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("estimator", "direct")
        super().__init__(*args, **kwargs)
        arms = len(self.prompts) * self.n_max
        self.rounds = max(1, math.ceil(math.log2(arms)))
        self.round = 0

    def _plan(self):
        if self.round >= self.rounds:
            return []
        wanted = self.active.any(axis=0)  # (P, n_max): arms active in some context
        p_idx, n_idx = np.nonzero(wanted)
        sizes = n_idx + 1
        remaining = self.budget - self.spent
        share = remaining // (self.rounds - self.round)
        per_arm = share // int(sizes.sum()) if sizes.sum() else 0
        if per_arm >= 1:
            return [(int(p), int(n), per_arm) for p, n in zip(p_idx, sizes)]
        order = self.rng.permutation(len(sizes))  # not every arm fits: a random affordable subset
        fits = order[np.cumsum(sizes[order]) <= max(share, min(remaining, int(sizes.min())))]
        return [(int(p_idx[i]), int(sizes[i]), 1) for i in fits]

    def _end_round(self) -> None:
        self._halve()
        self.round += 1
        if self.round >= self.rounds:
            self.finished = True

    def _out_of_budget(self) -> None:
        self._halve_to_the_end()


class UCB(Engine):
    def __init__(self, *args, exploration: float = 0.1, **kwargs) -> None:
        kwargs.setdefault("estimator", "direct")
        super().__init__(*args, **kwargs)
        self.c = exploration
        self.t = 0

    def _plan(self):
        counts = self.estimates.counts  # (P, n_max), shared by contexts
        mean = np.nan_to_num(self.estimates.mean(), nan=0.0)
        self.t += 1
        bonus = np.where(counts > 0, self.c * np.sqrt(np.log(self.t + 1) / np.maximum(counts, 1)), np.inf)
        noise = self.rng.random(mean.shape) * 1e-9  # random order among untried arms
        score = np.where(self.active, mean + bonus + noise, -np.inf).reshape(len(self.context_names), -1)
        choice = np.unique(score.argmax(axis=1))
        left = self.budget - self.spent
        plan = []
        for flat in choice:
            p, n = divmod(int(flat), self.n_max)
            if n + 1 <= left:
                plan.append((p, n + 1, 1))
                left -= n + 1
        return plan


class PromptThenN(Engine):
    """Pick each context's prompt at N=1 (half the budget), then spend the rest tuning its N."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.phase = 0
        self.chosen: np.ndarray | None = None

    def _plan(self):
        P = len(self.prompts)
        if self.phase == 0:
            per_prompt = (self.budget // 2) // P
            return [(p, 1, per_prompt) for p in range(P)] if per_prompt else self._advance()
        if self.phase == 1:
            prompts = np.unique(self.chosen)
            largest = np.where(self.active.any(axis=0), np.arange(1, self.n_max + 1), 0).max(axis=1)[prompts]
            per = (self.budget - self.spent) // int(largest.sum())
            return [(int(p), int(n), per) for p, n in zip(prompts, largest)] if per else []
        return []

    def _advance(self):
        self._choose()
        self.phase = 1
        return self._plan()

    def _choose(self) -> None:
        at_one = np.where(self.active[:, :, 0], np.nan_to_num(self.estimates.mean()[:, :, 0], nan=-np.inf), -np.inf)
        self.chosen = at_one.argmax(axis=1)
        keep = np.zeros_like(self.active)
        keep[np.arange(len(self.chosen)), self.chosen, :] = True
        self.active &= keep

    def _end_round(self) -> None:
        if self.phase == 0:
            self._choose()
            self.phase = 1
        else:
            self.finished = True
