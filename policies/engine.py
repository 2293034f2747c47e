"""ask/tell bookkeeping shared by PSST and the baselines: budget, outstanding pulls, estimates.

The engine plans pulls and reads outcomes; it never calls a model, so the same code runs against a
simulator, a replay server or real upstream calls in batches (the shape of httpx's auth flows).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from policies.arms import Context, RankedArm
from policies.estimators import ArmEstimates, encode_answers
from policies.pooled import PooledEstimates

__all__ = ["Engine", "Context", "Outcome", "Pull", "RankedArm", "feasible_mask", "first_of"]


@dataclass
class Outcome:
    """One pull's result: per-completion costs, and MV answers + gold or BoN scores (n, K).

    `query` (optional, any hashable) names the query, so pulls of one prompt on one query pool.
    """

    costs: np.ndarray
    answers: Sequence | np.ndarray | None = None
    gold: object = None
    scores: np.ndarray | None = None
    query: object = None


def first_of(order: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Mask of the first keep[r] entries of each row r of `order` (a permutation per row)."""
    mask = np.zeros(order.shape, dtype=bool)
    np.put_along_axis(mask, order, np.arange(order.shape[1])[None, :] < keep[:, None], axis=1)
    return mask


def feasible_mask(feasible: Mapping[str, Mapping[str, int]] | None, contexts: Sequence[str], prompts: Sequence[str],
                  n_max: int) -> np.ndarray:
    """mask[c, p, n-1]: arm (p, n) may be served in context c. `feasible[c][p]` is the largest N of
    prompt p in context c (capped at n_max); contexts or prompts not named allow every N ≤ n_max."""
    largest = np.full((len(contexts), len(prompts)), n_max, dtype=int)
    c_index, p_index = {c: i for i, c in enumerate(contexts)}, {p: i for i, p in enumerate(prompts)}
    for context, per_prompt in (feasible or {}).items():
        if context not in c_index:
            raise ValueError(f"feasible names an unknown context {context!r}")
        for prompt_id, n in per_prompt.items():
            if prompt_id not in p_index:
                raise ValueError(f"feasible[{context!r}] names an unknown prompt {prompt_id!r}")
            if int(n) != n or n < 1:
                raise ValueError(f"feasible[{context!r}][{prompt_id!r}] must be an integer ≥ 1, got {n!r}")
            largest[c_index[context], p_index[prompt_id]] = min(int(n), n_max)
    return np.arange(1, n_max + 1)[None, None, :] <= largest[:, :, None]


class Pull(tuple):
    """A planned pull `(prompt_id, n)`; `.query` names a query slot (pulls of one round share slots,
    so prompts are compared on the same queries) or is None when the executor picks the query."""

    query: int | None

    def __new__(cls, prompt_id: str, n: int, query: int | None = None) -> "Pull":
        self = super().__new__(cls, (prompt_id, n))
        self.query = query
        return self


class Engine:
    """ask/tell bookkeeping shared by PSST and the baselines: budget, outstanding pulls, estimates."""

    def __init__(self, prompts: Sequence[str], n_max: int, contexts: dict[str, Context], budget: int,
                 aggregator: str = "mv", seed: int = 0, estimator: str = "subset", permutations: int = 8,
                 n_queries: int | None = None, feasible: Mapping[str, Mapping[str, int]] | None = None,
                 shrink: bool | str = False, query_tilt: bool = True, query_keys: Sequence | None = None) -> None:
        # query_keys[s]: the `Outcome.query` of query slot s (then n_queries defaults to its length);
        # with them the engine can tell which slot an estimate's query is, and revisit it on purpose
        if aggregator not in ("mv", "bon"):
            raise ValueError("aggregator must be 'mv' or 'bon'")
        if not prompts or n_max < 1 or budget < 0 or not contexts:
            raise ValueError("need ≥ 1 prompt, n_max ≥ 1, budget ≥ 0 and ≥ 1 context")
        self.prompts = list(prompts)
        self.prompt_index = {p: i for i, p in enumerate(self.prompts)}
        self.n_max = n_max
        self.context_names = list(contexts)
        K = max(len(c.weights) for c in contexts.values())
        self.weights = np.array([list(c.weights) + [0.0] * (K - len(c.weights)) for c in contexts.values()])
        self.cost_weights = np.array([c.cost_weight for c in contexts.values()], dtype=float)
        self.budget = int(budget)
        self.aggregator = aggregator
        self.rng = np.random.default_rng(seed)
        if query_keys is not None:
            query_keys = list(query_keys)
            if n_queries is not None and n_queries != len(query_keys):
                raise ValueError(f"n_queries is {n_queries} but query_keys names {len(query_keys)} queries")
            n_queries = len(query_keys)
        self.n_queries = n_queries
        self._slot_of = {key: s for s, key in enumerate(query_keys or [])}
        self.spent = 0
        self.outstanding = 0
        self.finished = False
        self.estimator = estimator
        if estimator == "pooled":
            self.estimates = PooledEstimates(self.weights, self.cost_weights, len(self.prompts), n_max, shrink=shrink,
                                             query_tilt=query_tilt)
        else:
            self.estimates = ArmEstimates(self.weights, self.cost_weights, len(self.prompts), n_max, mode=estimator,
                                          permutations=permutations, rng=self.rng)
        self._fresh = np.ones(n_queries or 0, dtype=bool)  # query slots not planned since all last were
        self._seen = np.zeros(n_queries or 0, dtype=bool)  # query slots planned at least once in this run
        # feasible[c, p, n-1]: arm (p, n) may be served in context c (a tier's largest N per prompt)
        self.feasible = feasible_mask(feasible, self.context_names, self.prompts, n_max)
        # active[c, p, n-1]: arm (p, n) still a candidate in context c
        self.active = self.feasible.copy()
        self.cost_sum = np.zeros(len(self.prompts))  # observed per-completion costs, for ranked()
        self.cost_n = np.zeros(len(self.prompts))

    # -- protocol ---------------------------------------------------------------------------
    def ask(self) -> list[Pull]:
        if self.outstanding:
            raise RuntimeError(f"{self.outstanding} pulls of the current round are not told yet")
        if self.finished:
            return []
        plan = self._plan()  # list of (prompt index, n, pull count)
        pulls = self._pulls(plan)
        cost = sum(n for _, n in pulls)
        if not pulls or cost > self.budget - self.spent:
            self._out_of_budget()
            return []
        self.spent += cost
        self.outstanding = len(pulls)
        return pulls

    def tell(self, results: Iterable[tuple[str, int, Outcome]]) -> None:
        told = self._add_all(results)
        self.outstanding = max(0, self.outstanding - told)
        if self.outstanding == 0:
            self._end_round()

    def offer(self, results: Iterable[tuple[str, int, Outcome]]) -> int:
        """Stockpile pulls paid for elsewhere (served traffic); no budget spent. Returns how many."""
        return self._add_all((p, n, o) for p, n, o in results if p in self.prompt_index and 1 <= n <= self.n_max)

    def _add_all(self, results: Iterable[tuple[str, int, Outcome]]) -> int:
        """Fold results into the estimates, one vectorised update per (prompt, n) group."""
        groups: dict[tuple[int, int], list[Outcome]] = {}
        count = 0
        for prompt_id, n, outcome in results:
            groups.setdefault((self.prompt_index[prompt_id], int(n)), []).append(outcome)
            count += 1
        for (p, n), outcomes in groups.items():
            self._add(p, n, outcomes)
        return count

    def policy(self) -> dict[str, tuple[str, int]]:
        """Per context the active arm with the best estimate (unsampled arms rank last)."""
        value = self._active_values()
        value = np.where(self.active & np.isinf(value), -1e18, value)  # active but unsampled
        flat = value.reshape(len(self.context_names), -1).argmax(axis=1)
        p, n = np.unravel_index(flat, (len(self.prompts), self.n_max))
        return {c: (self.prompts[pi], int(ni) + 1) for c, pi, ni in zip(self.context_names, p, n)}

    def ranked(self, context: str, per_n: int = 1) -> list[RankedArm]:
        """The context's candidate arms, best first: the chosen arm (`policy()[context]`), then the
        best `per_n` prompts with data at each feasible N, by estimated value (ties: smaller N)."""
        c = self.context_names.index(context)
        mean, se = self.estimates.mean()[c], self.estimates.stderr()[c]  # (P, n_max)
        with np.errstate(invalid="ignore", divide="ignore"):
            unit = np.where(self.cost_n > 0, self.cost_sum / self.cost_n, np.nan)
        chosen = self.policy()[context]
        value = np.where(self.feasible[c] & np.isfinite(mean), mean, -np.inf)
        top = np.argsort(-value, axis=0, kind="stable")[: max(1, per_n)]  # (k, n_max) prompt indices
        n_idx = np.broadcast_to(np.arange(self.n_max), top.shape)
        keep = np.isfinite(value[top, n_idx])
        p_sel, n_sel = top[keep], n_idx[keep]
        order = np.lexsort((n_sel, -value[p_sel, n_sel]))
        arms = [(self.prompt_index[chosen[0]], chosen[1] - 1)]
        arms += [(int(p), int(n)) for p, n in zip(p_sel[order], n_sel[order]) if (p, n) != arms[0]]
        return [RankedArm(self.prompts[p], n + 1, float(mean[p, n]), float(se[p, n]), float((n + 1) * unit[p]))
                for p, n in arms]

    def estimate(self, context: str, prompt_id: str, n: int) -> tuple[float, float]:
        """(estimated value, its standard error) of one arm in one context; NaN when unknown."""
        c = self.context_names.index(context)
        p = self.prompt_index[prompt_id]
        return float(self.estimates.mean()[c, p, n - 1]), float(self.estimates.stderr()[c, p, n - 1])

    # -- hooks for subclasses -----------------------------------------------------------------
    def _plan(self) -> list[tuple[int, int, int]]:
        raise NotImplementedError

    def _end_round(self) -> None:
        pass

    def _out_of_budget(self) -> None:
        self.finished = True

    def _halve_to_the_end(self) -> None:
        """Budget gone before the last round: finish the halving on what was learned (stockpiled)."""
        while self.round < self.rounds:
            self._halve()
            self.round += 1
        self._finish()

    def _finish(self) -> None:
        self.finished = True

    # -- shared pieces ----------------------------------------------------------------------
    def _active_values(self) -> np.ndarray:
        """(C, P, n_max) estimated values of the active arms; −inf for inactive or unsampled ones."""
        return np.where(self.active, np.nan_to_num(self.estimates.mean(), nan=-np.inf), -np.inf)

    def _pulls(self, plan: list[tuple[int, int, int]]) -> list[Pull]:
        """Expand (prompt, n, count) into pulls; with n_queries known, all prompts share query slots."""
        if not plan:
            return []
        most = max(count for _, _, count in plan)
        slots = self._slots(most) if self.n_queries else None
        return [Pull(self.prompts[p], n, None if slots is None else int(slots[j]))
                for p, n, count in plan for j in range(count)]

    def _slots(self, count: int) -> np.ndarray:
        """`count` query slots, distinct while there are as many: first the revisits `_revisits` picks,
        as many as the share of slots already seen (a fresh query adds less as the unseen share of the
        training set shrinks), then slots not planned in this pass over the training set (more
        queries, less between-query noise), then others at random."""
        revisits = self._revisits(count * int(self._seen.sum()) // self.n_queries)
        taken = np.zeros(self.n_queries, dtype=bool)
        taken[revisits] = True
        fresh, rest = np.flatnonzero(self._fresh & ~taken), count - len(revisits)
        if rest <= len(fresh):
            drawn = self.rng.choice(fresh, size=rest, replace=False)
        else:
            seen, more = np.flatnonzero(~self._fresh & ~taken), rest - len(fresh)
            pool = seen if more <= len(seen) else np.arange(self.n_queries)
            drawn = np.concatenate([fresh, self.rng.choice(pool, size=more, replace=more > len(pool))])
        slots = np.concatenate([revisits, drawn]).astype(int)
        self._fresh[slots] = False
        self._seen[slots] = True
        if not self._fresh.any():
            self._fresh[:] = True
        return slots

    def _revisits(self, count: int) -> np.ndarray:
        """Up to `count` distinct slots, already seen, to plan again on purpose (none by default)."""
        return np.zeros(0, dtype=int)

    def _add(self, p: int, n: int, outcomes: list[Outcome]) -> None:
        costs = np.stack([np.asarray(o.costs, dtype=float) for o in outcomes])
        self.cost_sum[p] += float(costs.sum())
        self.cost_n[p] += costs.size
        if self.estimator == "pooled":
            keys = [o.query for o in outcomes]
            if self.aggregator == "mv":
                self.estimates.add_mv(p, keys, [o.answers for o in outcomes], [o.gold for o in outcomes], costs)
            else:
                self.estimates.add_bon(p, keys, np.stack([np.asarray(o.scores, dtype=float) for o in outcomes]), costs)
            return
        if self.aggregator == "mv":
            codes = np.stack([encode_answers(o.answers if isinstance(o.answers, np.ndarray) else list(o.answers), o.gold)
                              for o in outcomes])
            self.estimates.add_mv(p, codes, costs)
        else:
            self.estimates.add_bon(p, np.stack([np.asarray(o.scores, dtype=float) for o in outcomes]), costs)

    def _halve(self) -> None:
        """In every context drop the worse half of its active arms (never the last); vectorised."""
        C = len(self.context_names)
        value = np.nan_to_num(self.estimates.mean(), nan=-np.inf).reshape(C, -1)
        active = self.active.reshape(C, -1)
        n_of = np.tile(np.arange(1, self.n_max + 1), len(self.prompts))
        # rank by value, ties toward the cheaper scale; inactive arms sort last
        key = np.where(active, -value, np.inf)
        order = np.lexsort((np.broadcast_to(n_of, key.shape), key), axis=1)
        keep = np.maximum(1, np.ceil(active.sum(axis=1) / 2)).astype(int)
        self.active = (active & first_of(order, keep)).reshape(self.active.shape)
