"""Sequential majority-vote arms: completions are drawn in waves, and the request stops at the end of a
wave once its stopping rule says the vote is settled.

An arm is (prompt, N_max, waves, rule). Its value on one query is computed exactly from the query's
answer distribution: the vote counts are walked draw by draw as a multinomial (every count vector of
m draws over the K answer classes is a state; vectorised over queries), the mass a rule stops at a
wave's end is scored there, and what remains runs on. So each arm has an exact expected credit (ties
split, as in fixed-N majority vote), expected completions and expected waves, and the tier's utility
can weigh them against the fixed arms' on equal terms.

Rules, checked at a wave's end with m draws made and r = N_max − m left:
- `settled`: the leader cannot be caught by the r remaining draws (top − runner-up > r). The answer
  is then the one the full N_max would give: same credit as the fixed arm, fewer completions.
- `lead(d)`: the leader is at least d votes ahead of the runner-up (d ≥ 1): cheaper still, and may
  cost credit; the engine values that trade exactly.
- `never`: the fixed arm (one wave of N_max), for comparison on the same code path.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class StoppingRule:
    """When a wave's end stops the request: `never`, `settled`, or `lead` with a margin of `lead` votes."""

    kind: str = "settled"
    lead: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("never", "settled", "lead"):
            raise ValueError(f"unknown stopping rule {self.kind!r}")
        if self.kind == "lead" and self.lead < 1:
            raise ValueError("a lead rule needs a margin of at least one vote")

    def stops(self, top: np.ndarray, second: np.ndarray, drawn: int, n_max: int) -> np.ndarray:
        """Which states (leader's and runner-up's votes after `drawn` draws) stop now."""
        if self.kind == "never":
            return np.zeros(top.shape, dtype=bool)
        if self.kind == "settled":
            return top - second > n_max - drawn
        return top - second >= self.lead

    def __str__(self) -> str:
        return f"lead{self.lead}" if self.kind == "lead" else self.kind

    @classmethod
    def parse(cls, text: str) -> "StoppingRule":
        """The rule `str(rule)` wrote: `settled`, `never` or `lead<d>`."""
        if text.startswith("lead") and text[4:].isdigit():
            return cls("lead", lead=int(text[4:]))
        return cls(text)


@dataclass(frozen=True)
class Waves:
    """Wave sizes: `first` completions, then `step` at a time, the last wave cut to N_max; with
    `max_waves`, the last allowed wave draws everything left."""

    first: int = 1
    step: int = 1
    max_waves: int | None = None

    def regular(self, n_max: int) -> np.ndarray:
        """Wave ends before N_max where the rule is checked (N_max itself always ends the request)."""
        ends = np.arange(self.first, n_max, max(self.step, 1))
        return ends if self.max_waves is None else ends[: max(self.max_waves - 1, 0)]

    def ends(self, n_max: int) -> np.ndarray:
        """Cumulative draws at each wave's end, ending at n_max."""
        return np.append(self.regular(n_max), n_max)

    def __str__(self) -> str:
        return f"{self.first}+{self.step}" + (f"x{self.max_waves}" if self.max_waves else "")


@dataclass(frozen=True)
class SequentialValue:
    """Per query: expected vote credit, completions and waves of a sequential arm."""

    credit: np.ndarray
    completions: np.ndarray
    waves: np.ndarray


@lru_cache(maxsize=8)
def _states(n_max: int, classes: int) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Count vectors of m = 0..n_max draws over `classes` answer classes, and for each m and class k,
    where state s of m draws goes when the next draw is k (an index into the states of m + 1)."""
    base = n_max + 1
    powers = base ** np.arange(classes, dtype=np.int64)
    counts = [np.zeros((1, classes), dtype=np.int64)]
    successors: list[list[np.ndarray]] = []
    for _ in range(n_max):
        codes = counts[-1] @ powers
        following = np.unique(np.concatenate([codes + p for p in powers]))
        successors.append([np.searchsorted(following, codes + p) for p in powers])
        counts.append((following[:, None] // powers[None, :]) % base)
    return counts, successors


def _leaders(votes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(S,) votes of each state's leader and runner-up (0 when there is none)."""
    ordered = np.sort(votes, axis=1)
    second = ordered[:, -2] if ordered.shape[1] > 1 else np.zeros(len(ordered), dtype=ordered.dtype)
    return ordered[:, -1], second


def _vote_credit(counts: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """(S, R): credit of each state's vote for each query's gold class (ties split evenly)."""
    top = counts.max(axis=1)
    ties = (counts == top[:, None]).sum(axis=1)
    return (counts[:, gold] == top[:, None]) * (top > 0)[:, None] / ties[:, None]  # no votes earn nothing


def sequential_mv(probs: np.ndarray, gold: np.ndarray, n_max: int, waves: Waves, rule: StoppingRule,
                  abstain: bool = False) -> SequentialValue:
    """Exact expected credit, completions and waves of a sequential majority-vote arm, per query.

    probs: (R, K) answer-class distribution of each query under the arm's prompt; gold: (R,) class.
    With `abstain`, the last class is a draw that does not vote (no answer, or answers not modelled).
    """
    return sequential_mv_caps(probs, gold, (n_max,), waves, rule, abstain)[n_max]


def sequential_mv_caps(probs: np.ndarray, gold: np.ndarray, caps, waves: Waves,
                       rule: StoppingRule, abstain: bool = False) -> dict[int, SequentialValue]:
    """`sequential_mv` for several N_max at once, in one walk: a rule that does not look at N_max stops
    the same mass at the waves before any cap, and each cap ends the rest (`settled` takes one cap)."""
    probs, gold = np.asarray(probs, dtype=float), np.asarray(gold, dtype=int)
    caps = sorted(set(int(c) for c in caps))
    if rule.kind == "settled" and len(caps) > 1:
        raise ValueError("the settled rule depends on N_max: value one cap at a time")
    top_cap = caps[-1]
    counts, successors = _states(top_cap, probs.shape[1])
    votes = [c[:, :-1] for c in counts] if abstain else counts  # the classes that vote
    regular = set(int(e) for e in waves.regular(top_cap + 1))  # wave ends before any cap cuts them
    mass = np.ones((1, len(probs)))  # P(still drawing, in this state), (S, R)
    credit, completions, wave_count = (np.zeros(len(probs)) for _ in range(3))
    done_waves, values = 0, {}
    for m in range(1, top_cap + 1):
        following = np.zeros((len(counts[m]), len(probs)))
        for k, to in enumerate(successors[m - 1]):
            following[to] += mass * probs[:, k]  # each class maps states one-to-one
        mass = following
        if m in caps:  # this cap ends every request still drawing: one more wave (a short one, maybe)
            left = mass.sum(axis=0)
            values[m] = SequentialValue(credit + np.sum(mass * _vote_credit(votes[m], gold), axis=0),
                                        completions + m * left, wave_count + (done_waves + 1) * left)
        if m not in regular or m == top_cap:
            continue
        done_waves += 1
        stop = rule.stops(*_leaders(votes[m]), m, top_cap)
        if stop.any():
            stopped = mass[stop]
            credit += np.sum(stopped * _vote_credit(votes[m][stop], gold), axis=0)
            p_stop = stopped.sum(axis=0)
            completions += m * p_stop
            wave_count += done_waves * p_stop
            mass = np.where(stop[:, None], 0.0, mass)
    return values


def settled(answers: list, drawn: int, n_max: int, rule: StoppingRule) -> bool:
    """Serving's check at a wave's end: do the answers so far (None: no answer) stop the request?"""
    if drawn >= n_max:
        return True
    _, votes = np.unique(np.array([a for a in answers if a is not None], dtype=object), return_counts=True)
    return bool(rule.stops(*_leaders(np.append(votes, 0)[None, :]), drawn, n_max)[0])


def brute_force_mv(probs: np.ndarray, gold: int, n_max: int, waves: Waves, rule: StoppingRule,
                   abstain: bool = False) -> tuple[float, float, float]:
    """The same three numbers for one query by enumerating every sequence of n_max draws (tests only:
    K ** n_max sequences)."""
    K = len(probs)
    seqs = np.indices((K,) * n_max).reshape(n_max, -1).T  # (K^n, n)
    weight = np.prod(np.asarray(probs)[seqs], axis=1)
    ends = waves.ends(n_max)
    onehot = np.eye(K, dtype=np.int64)[seqs]  # (K^n, n, K)
    running = np.cumsum(onehot, axis=1)
    if abstain:
        running = running[:, :, :-1]
    stopped_at = np.full(len(seqs), n_max)
    wave_no = np.full(len(seqs), len(ends))
    open_ = np.ones(len(seqs), dtype=bool)
    for w, m in enumerate(ends, start=1):
        stop = open_ & (rule.stops(*_leaders(running[:, m - 1]), int(m), n_max) | (m == n_max))
        stopped_at[stop], wave_no[stop] = m, w
        open_ &= ~stop
    final = running[np.arange(len(seqs)), stopped_at - 1]
    credit = _vote_credit(final, np.array([gold]))[:, 0]
    return float(weight @ credit), float(weight @ stopped_at), float(weight @ wave_no)


def _modelled(counts: np.ndarray, missing: np.ndarray, rivals: int = 2) -> np.ndarray:
    """Plug-in distributions over (gold, the `rivals` strongest wrong answers, the rest): the rest (other
    wrong answers, no answer) is a class that does not vote, which keeps the vote walk small."""
    counts = np.asarray(counts, dtype=float)
    missing = np.asarray(missing, dtype=float)
    wrong = -np.sort(-counts[:, 1:], axis=1) if counts.shape[1] > 1 else np.zeros((len(counts), 0))
    kept = np.pad(wrong[:, :rivals], ((0, 0), (0, max(0, rivals - wrong.shape[1]))))
    rest = wrong[:, rivals:].sum(axis=1) + missing
    table = np.column_stack([counts[:, 0], kept, rest])
    total = table.sum(axis=1)
    return table[total > 0] / total[total > 0, None]


@dataclass(frozen=True)
class SequentialChoice:
    """A sequential arm chosen for a tier: its rule and N_max, and its plug-in value."""

    rule: StoppingRule
    n_max: int
    utility: float
    credit: float
    completions: float
    waves: float


LEARNED_RULES = (StoppingRule("settled"), StoppingRule("lead", lead=3), StoppingRule("lead", lead=4))


def best_sequential(counts: np.ndarray, missing: np.ndarray, cost: float, weight: float, n: int, n_limit: int,
                    waves: Waves, fixed_utility: float, rules=LEARNED_RULES) -> SequentialChoice | None:
    """The sequential arm of one prompt a tier should serve instead of its fixed arm (n), or None.

    counts: (rows, K) answer counts of the prompt's queries, gold in column 0, and missing: (rows,) draws
    without an answer (the engine's pooled counts: their plug-in distributions value every arm). Candidates: `settled` at n and at n_limit,
    and the lead rules at every N_max ≤ n_limit. The best by utility (credit − weight · cost ·
    completions) wins if it is at least `fixed_utility` (the fixed arm's plug-in value); among those
    as good, the one with the fewest completions (`settled` at n ties the fixed arm at weight 0).
    """
    probs = _modelled(counts, missing)
    if not len(probs) or n_limit < 1:
        return None
    gold = np.zeros(len(probs), dtype=int)
    candidates = []
    for rule in rules:
        if rule.kind == "settled":
            caps = {cap: sequential_mv(probs, gold, cap, waves, rule, abstain=True)
                    for cap in sorted({min(n, n_limit), n_limit})}
        else:
            caps = sequential_mv_caps(probs, gold, range(1, n_limit + 1), waves, rule, abstain=True)
        candidates += [(rule, cap, value) for cap, value in caps.items() if cap >= 2]  # N_max 1 is a fixed arm
    if not candidates:
        return None
    utility = np.array([v.credit.mean() - weight * cost * v.completions.mean() for _, _, v in candidates])
    good = np.flatnonzero(utility >= max(utility.max(), fixed_utility) - 1e-9)
    if not len(good):
        return None
    i = int(good[np.argmin([candidates[j][2].completions.mean() for j in good])])
    rule, cap, value = candidates[i]
    return SequentialChoice(rule, int(cap), float(utility[i]), float(value.credit.mean()),
                            float(value.completions.mean()), float(value.waves.mean()))
