"""Pooled plug-in arm estimates (ours): every completion of a prompt on one query, whatever its N.

Completions of prompt p on query x are i.i.d. draws from one distribution, so all pulls of (p, x)
pool into one empirical distribution, and the value of arm (p, n) on x is that of a vote (or a
best-of) over n draws from it — for every n, also above the N that was pulled. One curve per
(prompt, query) ranks every scale of the prompt, so PSST can pull small N on many queries (less
between-query noise) instead of the largest active N on a few. The plug-in is biased for small
pools, and not equally for every prompt: from 8 completions it overrates peaked answer
distributions against spread-out ones at large n (bench/README.md measures what that costs).
"""
from __future__ import annotations

from functools import lru_cache
from math import comb

import numpy as np

from policies.environments import mv_vote_credit
from policies.estimators import standard_error
from policies.shrinkage import Shrinkage


@lru_cache(maxsize=64)
def _binomial_table(n_max: int) -> np.ndarray:
    """C(n, k) for n, k = 0..n_max."""
    return np.array([[comb(n, k) for k in range(n_max + 1)] for n in range(n_max + 1)], dtype=float)


def plugin_vote_credit(counts: np.ndarray, missing: np.ndarray, n_max: int) -> np.ndarray:
    """Expected vote credit at n = 1..n_max when drawing from the empirical answer distribution.

    counts (B, L): answer counts, gold in column 0; missing (B,): completions with no answer, which
    never vote. Returns (B, n_max).
    """
    counts = np.asarray(counts, dtype=float)
    valid = counts.sum(axis=1)
    out = np.zeros((len(counts), n_max))
    rows = valid > 0
    if not rows.any():
        return out
    probs = counts[rows] / valid[rows, None]
    by_votes = mv_vote_credit(probs, np.zeros(len(probs), dtype=int), n_max)  # credit given k valid votes
    out[rows] = thin(by_votes, counts[rows], np.asarray(missing, dtype=float)[rows])
    return out


def thin(by_votes: np.ndarray, counts: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """Credit at n draws when each draw is an answer with the row's observed rate: (B, n_max) curves
    by number of valid votes → by number of draws (a binomial mixture; rows without a missing answer
    are unchanged; rows with no valid answer earn 0)."""
    valid = np.asarray(counts, dtype=float).sum(axis=1)
    total = valid + missing
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.where(total > 0, missing / total, 1.0)  # P(no answer)
    rows = q > 0
    if not rows.any():
        return by_votes
    out = by_votes.copy()
    n_max = by_votes.shape[1]
    k = np.arange(n_max + 1)
    lost = np.arange(1, n_max + 1)[:, None] - k[None, :]  # (n, k): completions without an answer
    binom = _binomial_table(n_max)[1:, :]  # C(n, k), n = 1..n_max
    qr = q[rows]
    weights = binom[None] * (1 - qr)[:, None, None] ** k * qr[:, None, None] ** np.maximum(lost, 0) * (lost >= 0)
    credit0 = np.concatenate([np.zeros((rows.sum(), 1)), by_votes[rows]], axis=1)  # k = 0 earns 0
    out[rows] = np.einsum("bnk,bk->bn", weights, credit0)
    return out


@lru_cache(maxsize=256)
def _max_of_draws_weights(m: int, n_max: int) -> np.ndarray:
    """W[i, n−1] = P(the i-th smallest of m values is the max of n draws with replacement)."""
    i = np.arange(1, m + 1)[:, None] / m
    n = np.arange(1, n_max + 1)[None, :]
    return i**n - (i - 1.0 / m) ** n


class PooledEstimates:
    """Per (prompt, query) pooled outcomes and their plug-in value curves, for every context.

    Same reading interface as `ArmEstimates` (mean, stderr); rows are (prompt, query) pairs. A pull
    without a query key is its own row. Per-prompt sums are kept up to date row by row.
    """

    def __init__(self, weights: np.ndarray, cost_weights: np.ndarray, n_prompts: int, n_max: int,
                 shrink: bool | str = False, query_tilt: bool = True) -> None:
        self.weights = np.asarray(weights, dtype=float)
        self.cost_weights = np.asarray(cost_weights, dtype=float)
        self.n_prompts, self.n_max = n_prompts, n_max
        C = len(self.cost_weights)
        self.rows: dict[tuple[int, object], int] = {}
        self.row_prompt = np.zeros(0, dtype=int)
        self.queries: dict[object, int] = {}  # query key → index (a pull without a key is a query of its own)
        self.row_query = np.zeros(0, dtype=int)
        self.curves = np.zeros((C, 0, n_max))  # quality per context, row, n
        # shrunk MV: posterior variance of each row's credit at n valid votes (before thinning and level)
        self.variance = np.zeros((0, n_max))
        self._posterior = False  # whether `variance` holds posteriors (shrunk MV curves computed)
        self.sums = np.zeros((C, n_prompts, n_max))  # Σ over a prompt's rows of curves, and of squares
        self.squares = np.zeros((C, n_prompts, n_max))
        self.row_count = np.zeros(n_prompts)
        self.counts = np.zeros((0, 1), dtype=np.int64)  # MV: answer counts per row, gold in column 0
        self.missing = np.zeros(0, dtype=np.int64)
        self.vocab: dict[int, dict[str, int]] = {}  # MV with text answers, per row: answer → column
        self.scores: dict[int, np.ndarray] = {}  # BoN, per row: pooled per-completion utilities (C, m)
        self.cost_sum = np.zeros(n_prompts)
        self.cost_n = np.zeros(n_prompts)
        self._anonymous = 0
        self._curve_cache: dict[bytes, np.ndarray] = {}
        self._dirty: list[np.ndarray] = []  # MV rows whose curves are stale (computed in one batch on read)
        # MV curves: False = plug-in; True = empirical-Bayes (policies.shrinkage), each prompt's κ chosen by
        # cross-validation; "soft" = the same, averaged over κ with weights ∝ held-out likelihood
        if shrink not in (False, True, "soft"):
            raise ValueError(f"shrink must be False, True or 'soft', got {shrink!r}")
        self.shrinkage = Shrinkage(n_prompts, n_max, soft=shrink == "soft") if shrink else None
        self.n_classes = 0  # MV answer classes seen (integer labels), for the shrinkage atoms
        self.query_tilt = query_tilt  # shrunk rows' priors tilted by the other prompts' answers on their query

    # -- rows -------------------------------------------------------------------------------
    def _row_ids(self, prompt: int, keys: list) -> np.ndarray:
        ids, new_queries = [], []
        for key in keys:
            if key is None:
                key = ("anonymous", self._anonymous)
                self._anonymous += 1
            row = self.rows.get((prompt, key))
            if row is None:
                row = self.rows[(prompt, key)] = len(self.rows)
                new_queries.append(self.queries.setdefault(key, len(self.queries)))
            ids.append(row)
        grow = len(self.rows) - len(self.row_prompt)
        if grow:
            self.row_prompt = np.concatenate([self.row_prompt, np.full(grow, prompt)])
            self.row_query = np.concatenate([self.row_query, np.array(new_queries, dtype=int)])
            self.curves = np.concatenate([self.curves, np.zeros((self.curves.shape[0], grow, self.n_max))], axis=1)
            self.variance = np.concatenate([self.variance, np.zeros((grow, self.n_max))])
            self.counts = np.concatenate([self.counts, np.zeros((grow, self.counts.shape[1]), dtype=np.int64)])
            self.missing = np.concatenate([self.missing, np.zeros(grow, dtype=np.int64)])
            self.row_count[prompt] += grow
        return np.array(ids, dtype=int)

    def _set_curves(self, rows: np.ndarray, curves: np.ndarray) -> None:
        """Replace the curves of distinct `rows` (C, len(rows), n_max), keeping per-prompt sums."""
        old = self.curves[:, rows, :]
        onehot = (self.row_prompt[rows][None, :] == np.arange(self.n_prompts)[:, None]).astype(float)  # (P, R)
        self.sums += np.einsum("pr,crn->cpn", onehot, curves - old)
        self.squares += np.einsum("pr,crn->cpn", onehot, curves**2 - old**2)
        self.curves[:, rows, :] = curves

    def _add_costs(self, prompt: int, costs: np.ndarray) -> None:
        self.cost_sum[prompt] += float(costs.sum())
        self.cost_n[prompt] += costs.size

    # -- majority vote ----------------------------------------------------------------------
    def add_mv(self, prompt: int, keys: list, answers: list, golds: list, costs: np.ndarray) -> None:
        """Pulls of one prompt: per pull its query key, answers (labels or int classes, None/−1 = no
        answer) and gold; costs (Q, n)."""
        rows = self._row_ids(prompt, keys)
        self._add_costs(prompt, costs)
        lengths = np.array([len(a) for a in answers])
        if all(isinstance(a, np.ndarray) and a.dtype.kind in "iu" for a in answers):  # simulator classes
            classes = np.concatenate(answers)
            self.n_classes = max(self.n_classes, int(classes.max(initial=-1)) + 1)
            gold = np.repeat(np.asarray(golds), lengths)
            columns = np.where(classes < 0, -1, np.where(classes == gold, 0, classes + 1))
        else:
            columns = np.concatenate([self._columns(row, ans, g) for row, ans, g in zip(rows, answers, golds)])
        row_of = np.repeat(rows, lengths)
        width = int(columns.max(initial=-1)) + 1
        if width > self.counts.shape[1]:
            self.counts = np.pad(self.counts, ((0, 0), (0, width - self.counts.shape[1])))
        ok = columns >= 0
        np.add.at(self.counts, (row_of[ok], columns[ok]), 1)
        np.add.at(self.missing, row_of[~ok], 1)
        self._dirty.append(rows)

    def _columns(self, row: int, answers, gold) -> np.ndarray:
        """Count columns of one pull's text answers: 0 = gold, −1 = no answer, others stable per row."""
        labels = np.array(["" if a is None else str(a) for a in answers], dtype=str)
        distinct, inverse = np.unique(labels, return_inverse=True)
        vocab = self.vocab.setdefault(row, {})
        gold_label = "" if gold is None else str(gold)
        mapped = []
        for label in distinct:  # one lookup per distinct answer, not per completion
            if label == "":
                mapped.append(-1)
            elif label == gold_label:
                mapped.append(0)
            else:
                mapped.append(vocab.setdefault(label, len(vocab) + 1))
        return np.array(mapped, dtype=int)[inverse.reshape(-1)]

    def _refresh(self) -> None:
        """Recompute stale vote curves: one batch per read, however many pulls came in between."""
        if not self._dirty:
            return
        touched = np.unique(np.concatenate(self._dirty))
        self._dirty = []
        if self.shrinkage is not None:
            if self.query_tilt:  # a row's prior moves with any row on its query: redo all rows
                touched, others = np.arange(len(self.row_prompt)), self._others()
            else:  # a prompt's prior moves with any of its rows: redo all its rows
                touched, others = np.flatnonzero(np.isin(self.row_prompt, self.row_prompt[touched])), None
            counts = self.counts[touched]
            # integer labels: classes seen; text answers: the widest row (gold + its distinct wrong answers)
            classes = self.n_classes or counts.shape[1]
            quality = thin(self.shrinkage.curves(self.row_prompt[touched], counts, classes, others), counts,
                           self.missing[touched].astype(float))
            self.variance[touched] = self.shrinkage.variance
            self._posterior = True
        else:
            quality = self._vote_curves(self.counts[touched], self.missing[touched])
        self._set_curves(touched, self.weights[:, :1, None] * quality[None])

    def _others(self) -> np.ndarray:
        """(R, 2) per MV row the other prompts' gold and non-gold answer counts on its query."""
        gold = self.counts[:, 0].astype(float)
        wrong = self.counts[:, 1:].sum(axis=1).astype(float)
        size = len(self.queries)
        on_query = np.stack([np.bincount(self.row_query, gold, size), np.bincount(self.row_query, wrong, size)], axis=1)
        return on_query[self.row_query] - np.stack([gold, wrong], axis=1)

    def _vote_curves(self, counts: np.ndarray, missing: np.ndarray) -> np.ndarray:
        """Plug-in credit curves, computed once per distinct (gold, sorted others, missing) signature."""
        signature = np.concatenate([counts[:, :1], -np.sort(-counts[:, 1:], axis=1), missing[:, None]], axis=1)
        distinct, inverse = np.unique(signature, axis=0, return_inverse=True)
        keys = [d.tobytes() for d in distinct]
        new = [i for i, k in enumerate(keys) if k not in self._curve_cache]
        if new:
            counts = distinct[new, :-1]
            used = max(1, int((counts > 0).any(axis=0).nonzero()[0].max(initial=0)) + 1)  # drop all-zero columns
            fresh = plugin_vote_credit(counts[:, :used], distinct[new, -1], self.n_max)
            self._curve_cache.update({keys[i]: c for i, c in zip(new, fresh)})
        return np.stack([self._curve_cache[k] for k in keys])[inverse.reshape(-1)]

    # -- best-of-n --------------------------------------------------------------------------
    def add_bon(self, prompt: int, keys: list, scores: np.ndarray, costs: np.ndarray) -> None:
        """Pulls of one prompt: per pull its query key; scores (Q, n, K), costs (Q, n)."""
        rows = self._row_ids(prompt, keys)
        self._add_costs(prompt, costs)
        u = np.einsum("qnk,ck->qcn", scores, self.weights)
        touched = np.unique(rows)
        curves = np.empty((len(self.cost_weights), len(touched), self.n_max))
        for i, row in enumerate(touched):  # one update per (prompt, query) row, vectorised inside
            earlier = [self.scores[row]] if row in self.scores else []
            pooled = np.concatenate(earlier + [u[j] for j in np.flatnonzero(rows == row)], axis=1)
            self.scores[row] = pooled
            ordered = np.sort(pooled, axis=1)
            curves[:, i, :] = ordered @ _max_of_draws_weights(ordered.shape[1], self.n_max)
        self._set_curves(touched, curves)

    # -- reading ----------------------------------------------------------------------------
    def cost_per_completion(self) -> np.ndarray:
        """(P,) mean cost of one completion of each prompt (0 before its first pull)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.cost_n > 0, self.cost_sum / self.cost_n, 0.0)

    def answer_counts(self, prompt: int) -> tuple[np.ndarray, np.ndarray]:
        """MV: the prompt's rows (one per query), answer counts with gold in column 0, and draws without
        an answer."""
        rows = self.row_prompt == prompt
        return self.counts[rows], self.missing[rows]

    def _cost_curve(self) -> np.ndarray:
        per_completion = self.cost_per_completion()
        return self.cost_weights[:, None, None] * per_completion[None, :, None] * np.arange(1, self.n_max + 1)

    def mean(self) -> np.ndarray:
        """(C, P, n_max) estimated values; NaN for prompts never pulled."""
        self._refresh()
        return self.mean_of(self.sums)

    def mean_of(self, sums: np.ndarray) -> np.ndarray:
        """(C, P, n_max) values from per-prompt sums of row curves: their mean over each prompt's rows
        less the cost curve; NaN for prompts never pulled."""
        r = self.row_count[None, :, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(r > 0, sums / r, np.nan) - self._cost_curve()

    def uncertainty(self, alive: np.ndarray, best: np.ndarray) -> np.ndarray | None:
        """(Q,) per query (in `queries` order) how uncertain the active prompts' values on it are: over
        contexts c and the prompts p alive there (`alive`, (C, P)), the sum of the posterior variance
        of row (p, query)'s credit at N = best[c, p] + 1, times the context's gold weight squared. The
        variance is of the credit at that many valid votes (before the thinning for missing answers
        and the level shift), an approximation where answers go missing. None without a posterior
        (plug-in curves, best-of-N)."""
        self._refresh()
        if not self._posterior:
            return None
        rp = self.row_prompt
        spread = self.variance[np.arange(len(rp))[None, :], best[:, rp]]  # (C, R)
        weight = self.weights[:, :1] ** 2 * alive[:, rp]  # (C, R)
        return np.bincount(self.row_query, (weight * spread).sum(axis=0), len(self.queries))

    def stderr(self) -> np.ndarray:
        """(C, P, n_max) standard error over the prompt's queries (NaN below two queries)."""
        self._refresh()
        return standard_error(self.sums, self.squares, self.row_count[None, :, None])
