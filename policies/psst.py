"""PSST: learn the best (prompt, N) per context under a completion budget, through ask/tell.

The engine plans pulls and reads outcomes; it never calls a model, so the same code runs against a
simulator, a replay server or real upstream calls in batches (the shape of httpx's auth flows).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from policies.arms import Context, RankedArm
from policies.engine import Engine, Outcome, Pull, feasible_mask, first_of

__all__ = ["PSST", "PLAN_VERSION", "Context", "Outcome", "TopK", "Pull", "RankedArm", "Engine", "feasible_mask",
           "first_of"]

POOLED_PULL_SIZE = 8  # completions per pull with plug-in curves (bench/README.md: 6, 8, 12, 16 compared)
SHRUNK_PULL_SIZE = 4  # with shrunk curves, whose prior corrects small pools' bias (bench/README.md, issue 11)
PLAN_VERSION = 3  # bumped when the same settings, seed and outcomes would plan other pulls (2: query tilt;
# 3: revisits of the most uncertain seen queries)


@dataclass(frozen=True)
class TopK:
    """Screening: spend `fraction` of the budget on pulls at N=`n` (the paper: 1), then keep the k
    prompts per context whose best arm with N ≤ `n` is estimated best."""

    k: int
    fraction: float = 0.2
    n: int = 1


class PSST(Engine):
    """Prompt Scaling via Sequential Trimming: rounds of pulls, halving the arms of every context.

    Default (ours): pooled estimates (`policies.pooled`) whose MV vote curves are shrunk toward each
    prompt's fitted prior (`policies.shrinkage`; `shrink="soft"`, the default, averages the priors over
    the shrinkage strengths κ weighted by held-out likelihood; `True` picks one κ per prompt; `False`
    is the plug-in curve of each row's own counts; with shrinkage, each row's prior is also tilted by
    the other prompts' answers on its query unless `query_tilt=False`), every active prompt pulled at
    one size per round on fresh, shared queries — `min_pull` (4 with shrunk vote curves, 8 with
    plug-in ones and for best-of-N), larger only when the round would otherwise revisit queries;
    `pull_size` fixes it; with `query_keys` and shrunk curves, the share of a round's slots that the
    run has already seen of the training set revisits the seen queries the active prompts are least
    certain on (`_revisits`) — and ⌈log2 P⌉ rounds that halve each context's prompts (keeping all their
    N): one curve per (prompt, query) values every N, so small pulls on many
    queries replace the paper's pulls at the largest active N on a few. With `estimator="subset"`
    (or "block", the paper's): pulls at the largest active N and halving of arms over ⌈log2 |A|⌉
    rounds, as published.

    Budget schedule: round r gets ⌊remaining / rounds left⌋ (so floor leftovers carry forward);
    when that cannot buy one pull of every active prompt at its largest N, the round borrows from
    later rounds (which have fewer arms), and if the whole remaining budget cannot, N is scaled
    down proportionally so the budget is never exceeded.
    """

    def __init__(self, prompts: Sequence[str], n_max: int, contexts: dict[str, Context], budget: int,
                 aggregator: str = "mv", seed: int = 0, screening: TopK | None = None, pull_size: int | None = None,
                 estimator: str = "pooled", halve_prompts: bool | None = None, min_pull: int | None = None,
                 shrink: bool | str = "soft", **options) -> None:
        # shrink: pooled MV curves shrunk toward each prompt's fitted prior (policies.shrinkage): "soft", True or False
        super().__init__(prompts, n_max, contexts, budget, aggregator, seed, estimator=estimator, shrink=shrink,
                         **options)
        # the unit of halving: prompts (all their N kept) by default when pooled, else arms (the paper)
        self.halve_prompts = estimator == "pooled" if halve_prompts is None else halve_prompts
        if pull_size is not None and estimator != "pooled":
            raise ValueError("pull_size needs estimator='pooled' (other estimators cannot value n above a pull's N)")
        self.pull_size = pull_size if estimator == "pooled" else None  # None: chosen per round (pooled)
        shrunk = bool(shrink) and aggregator == "mv"  # shrinkage models vote curves; best-of-N stays plug-in
        self.min_pull = min_pull if min_pull is not None else SHRUNK_PULL_SIZE if shrunk else POOLED_PULL_SIZE
        self.screening = screening
        self.screen_budget = int(math.floor(screening.fraction * budget)) if screening else 0
        self.phase = "screen" if screening else "rounds"
        self.round = 0
        self.rounds = self._rounds_for(self.active)

    def _rounds_for(self, active: np.ndarray) -> int:
        """⌈log2⌉ of the most candidates in a context: arms, or prompts when halving prompts (one
        pooled curve values all arms of a prompt, so its pulls cannot tell those arms apart)."""
        alive = active.any(axis=2) if self.halve_prompts else active.reshape(active.shape[0], -1)
        most = int(alive.sum(axis=1).max())
        return max(1, math.ceil(math.log2(most))) if most > 1 else 1

    def _plan(self) -> list[tuple[int, int, int]]:
        if self.phase == "screen":
            n = np.minimum(min(self.screening.n, self.n_max), self._largest())  # screen within feasible N
            per_prompt = self.screen_budget // int(n.sum())
            if per_prompt == 0:
                self.phase = "rounds"
                return self._plan()
            return [(p, int(n[p]), per_prompt) for p in range(len(self.prompts))]
        if self.round >= self.rounds:
            return []
        largest = self._largest()  # N_p: the largest N of p active in some context
        remaining = self.budget - self.spent
        share = remaining // (self.rounds - self.round)
        if self.estimator == "pooled":  # pooled curves value every n from any pull: pull each prompt at one size
            largest = np.minimum(largest, self.pull_size or self._pull_size(share, int((largest > 0).sum())))
        prompts = np.flatnonzero(largest)
        M = int(largest.sum())
        if share >= M:
            return [(int(p), int(largest[p]), share // M) for p in prompts]
        if remaining >= M:
            return [(int(p), int(largest[p]), 1) for p in prompts]
        scaled = np.maximum(1, np.floor(largest[prompts] * remaining / M)).astype(int)
        while scaled.sum() > remaining and scaled.max() > 1:
            scaled[scaled.argmax()] -= 1
        if scaled.sum() > remaining:  # not even one completion per prompt: pull the current leaders
            leaders = self._leaders(prompts)[:remaining]
            return [(int(p), 1, 1) for p in leaders]
        return [(int(p), int(n), 1) for p, n in zip(prompts, scaled)]

    def _pull_size(self, share: int, alive: int) -> int:
        """Completions per pull this round: `min_pull`, more once the round's pulls per prompt
        would exceed the query slots not yet used (then pools grow on queries already seen)."""
        per_prompt = share // max(alive, 1)
        fresh = int(self._fresh.sum()) if self.n_queries else 0
        size = self.min_pull if not fresh else max(self.min_pull, math.ceil(per_prompt / fresh))
        return int(min(size, self.n_max))

    def _revisits(self, count: int) -> np.ndarray:
        """The seen slots whose queries the active prompts are least certain on (`uncertainty`), most
        uncertain first: there another pull narrows the compared values most. Needs the slots' query
        keys and a posterior (shrunk vote curves); none in screening."""
        none = np.zeros(0, dtype=int)
        if not count or self.phase != "rounds" or not self._slot_of or self.estimator != "pooled":
            return none
        uncertainty = self.estimates.uncertainty(self.active.any(axis=2), self._active_values().argmax(axis=2))
        if uncertainty is None:
            return none
        keys = list(self.estimates.queries)  # in index order (a dict keeps insertion order)
        slot = np.array([self._slot_of.get(key, -1) for key in keys], dtype=int)
        ok = (slot >= 0) & (uncertainty > 0)
        ok[ok] &= self._seen[slot[ok]]
        order = np.flatnonzero(ok)[np.argsort(-uncertainty[ok], kind="stable")]
        return slot[order[:count]]

    def _largest(self) -> np.ndarray:
        """Per prompt the largest N active in some context (0 when none)."""
        return np.where(self.active.any(axis=0), np.arange(1, self.n_max + 1), 0).max(axis=1)

    def _leaders(self, prompts: np.ndarray) -> np.ndarray:
        value = self._active_values().max(axis=(0, 2))
        return prompts[np.argsort(-value[prompts], kind="stable")]

    def _end_round(self) -> None:
        if self.phase == "screen":
            self._screen()
            self.phase = "rounds"
            self.rounds = self._rounds_for(self.active)
            return
        self._halve()
        self.round += 1
        if self.round >= self.rounds:
            self._finish()

    def _halve(self) -> None:
        if not self.halve_prompts:
            super()._halve()
            return
        # per context keep the better half of its prompts (by their best arm), all their N with them
        value = self._active_values().max(axis=2)
        alive = self.active.any(axis=2)
        value = np.where(alive & np.isinf(value), -1e18, value)  # alive but unsampled ranks above dropped
        keep = np.maximum(1, np.ceil(alive.sum(axis=1) / 2)).astype(int)
        self.active &= first_of(np.argsort(-value, axis=1, kind="stable"), keep)[:, :, None]

    def _finish(self) -> None:
        """Halving prompts ends with one prompt per context: its best N is the survivor."""
        if self.halve_prompts and self.phase == "rounds":
            chosen = self.policy()
            survivors = np.zeros_like(self.active)
            for c, (prompt_id, n) in enumerate(chosen.values()):
                survivors[c, self.prompt_index[prompt_id], n - 1] = True
            self.active = survivors
        self.finished = True

    def _screen(self) -> None:
        """Keep the k prompts with the best screened estimate (best N ≤ screening scale) per context."""
        k = min(self.screening.k, len(self.prompts))
        n = min(self.screening.n, self.n_max)
        screened = np.where(self.active[:, :, :n], np.nan_to_num(self.estimates.mean()[:, :, :n], nan=-np.inf),
                            -np.inf).max(axis=2)  # (C, P)
        order = np.argsort(-screened, axis=1, kind="stable")
        self.active &= first_of(order, np.full(len(order), k))[:, :, None]

    def _out_of_budget(self) -> None:
        if self.phase == "rounds":
            self._halve_to_the_end()
        else:
            self.finished = True
