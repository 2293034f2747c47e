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
- `likely(ε)`: the chance that the r remaining draws would change the answer is below ε. The
  runner-up's share of the two leaders' votes is given a Beta(runner-up + 1, leader + 1) posterior
  (uniform prior), and every remaining draw is assumed to go to one of the two (the worst case for
  the leader against the runner-up; rivals level in second place are not added up); the answer
  changes if the runner-up would finish level or ahead (a level finish counts half). ε → 0 is
  `settled`; a small ε stops long before `settled` on queries whose votes lean one way, and changes
  the answer on few paths (the exact walk says how few, and what it costs).
- `lead(d)`: the leader is at least d votes ahead of the runner-up (d ≥ 1): cheaper still, and may
  cost credit; the engine values that trade exactly.
- `never`: the fixed arm (one wave of N_max), for comparison on the same code path.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=4)
def _log_factorials(size: int) -> np.ndarray:
    """log i! for i < size (read-only)."""
    table = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, size)))])
    table.flags.writeable = False
    return table


def overturn_chance(top, second, left: int) -> np.ndarray:
    """The chance that the runner-up finishes level with (counts half) or ahead of the leader, for
    states with `top` and `second` votes and `left` draws to go, when the runner-up's share q of the
    two leaders' votes has a Beta(second + 1, top + 1) posterior and all `left` draws go to the two
    (a beta-binomial tail; O(left) per state, vectorised over states). Looking at the runner-up only,
    it understates the chance when several rivals are level in second place."""
    top = np.asarray(top, dtype=np.int64)[..., None]
    second = np.asarray(second, dtype=np.int64)[..., None]
    left = int(left)
    j = np.arange(left + 1)  # draws that go to the runner-up
    lf = _log_factorials(int(top.max(initial=0)) + int(second.max(initial=0)) + left + 2)
    # C(left, j) · B(second + 1 + j, top + 1 + left − j) / B(second + 1, top + 1), B(a, b) = Γ(a)Γ(b)/Γ(a+b)
    log_p = (lf[left] - lf[j] - lf[left - j] + lf[second + j] + lf[top + left - j] - lf[top + second + left + 1]
             - lf[second] - lf[top] + lf[top + second + 1])
    margin = 2 * j - (top - second) - left  # runner-up's final votes − leader's
    weight = np.where(margin > 0, 1.0, np.where(margin == 0, 0.5, 0.0))
    return np.sum(weight * np.exp(log_p), axis=-1)


@dataclass(frozen=True)
class StoppingRule:
    """When a wave's end stops the request: `never`, `settled`, `likely` with a `risk` ε of changing
    the answer, or `lead` with a margin of `lead` votes."""

    kind: str = "settled"
    lead: int = 0
    risk: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("never", "settled", "likely", "lead"):
            raise ValueError(f"unknown stopping rule {self.kind!r}")
        if self.kind == "lead" and self.lead < 1:
            raise ValueError("a lead rule needs a margin of at least one vote")
        if self.kind == "likely" and not 0 < self.risk < 1:
            raise ValueError("a likely rule needs a risk between 0 and 1")

    def stops(self, top: np.ndarray, second: np.ndarray, drawn: int, n_max: int) -> np.ndarray:
        """Which states (leader's and runner-up's votes after `drawn` draws) stop now."""
        if self.kind == "never":
            return np.zeros(top.shape, dtype=bool)
        left = n_max - drawn
        if self.kind == "settled":
            return top - second > left
        if self.kind == "likely":
            return (top - second > left) | (overturn_chance(top, second, left) < self.risk)
        return top - second >= self.lead

    def __str__(self) -> str:
        if self.kind == "lead":
            return f"lead{self.lead}"
        return f"likely{self.risk!r}" if self.kind == "likely" else self.kind

    @classmethod
    def parse(cls, text: str) -> "StoppingRule":
        """The rule `str(rule)` wrote: `settled`, `never`, `likely<ε>` or `lead<d>`."""
        if text.startswith("lead") and text[4:].isdigit():
            return cls("lead", lead=int(text[4:]))
        if text.startswith("likely"):
            try:
                risk = float(text[6:])
            except ValueError:
                raise ValueError(f"unknown stopping rule {text!r}") from None
            return cls("likely", risk=risk)
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
    if rule.kind in ("settled", "likely") and len(caps) > 1:
        raise ValueError(f"the {rule.kind} rule depends on N_max: value one cap at a time")
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
    """A sequential arm chosen for a tier: its rule and N_max, its plug-in value, and the fixed arm's
    plug-in value on the same counts (their difference is the gain to add to another estimate)."""

    rule: StoppingRule
    n_max: int
    utility: float
    credit: float
    completions: float
    waves: float
    fixed_utility: float


DEFAULT_TOLERANCE = 1e-5  # utility a learned tier gives up for fewer completions: one answer in 10⁵ requests


def learned_rules(risk: float = 0.001) -> tuple[StoppingRule, ...]:
    """The rules training tries for `adaptive: {rule: learned}` (`risk`: the tier's, for `likely`)."""
    return (StoppingRule("settled"), StoppingRule("likely", risk=risk), StoppingRule("lead", lead=3),
            StoppingRule("lead", lead=4))


def best_sequential(counts: np.ndarray, missing: np.ndarray, cost: float, weight: float, n: int, n_limit: int,
                    waves: Waves, rules: tuple[StoppingRule, ...] | None = None,
                    tolerance: float = 0.0) -> SequentialChoice | None:
    """The sequential arm of one prompt a tier should serve instead of its fixed arm (n), or None.

    counts: (rows, K) answer counts of the prompt's queries, gold in column 0, and missing: (rows,) draws
    without an answer (the engine's pooled counts: their plug-in distributions value every arm).
    Candidates (`rules`, default `learned_rules()`): the rules that look at N_max (`settled`,
    `likely`) at n and at n_limit, the lead rules at every N_max ≤ n_limit; an arm that can never
    stop before its N_max is a fixed arm in disguise and is left out (N is the engine's choice).
    Utility is credit − weight · cost · completions, for the candidates and for the fixed arm alike,
    on the same plug-in distributions (the engine's own estimate of the fixed
    arm may be modelled otherwise, e.g. shrunk, and is not comparable). The candidates within
    `tolerance` of the best utility and of the fixed arm's qualify, and the one with the fewest
    completions wins (`settled` at n ties the fixed arm at weight 0; a tolerance lets a `likely` arm
    that changes an answer once in 10⁵ requests win there).
    """
    probs = _modelled(counts, missing)
    if not len(probs) or n_limit < 1:
        return None
    gold = np.zeros(len(probs), dtype=int)
    candidates = []
    for rule in rules or learned_rules():
        if rule.kind in ("settled", "likely"):
            caps = {cap: sequential_mv(probs, gold, cap, waves, rule, abstain=True)
                    for cap in sorted({min(n, n_limit), n_limit})}
        else:
            caps = sequential_mv_caps(probs, gold, range(1, n_limit + 1), waves, rule, abstain=True)
        candidates += [(rule, cap, value) for cap, value in caps.items()
                       if cap >= 2 and value.completions.mean() < cap - 1e-9]  # it stops early on some path
    if not candidates:
        return None
    utility = np.array([v.credit.mean() - weight * cost * v.completions.mean() for _, _, v in candidates])
    fixed_n = min(n, n_limit)
    fixed = sequential_mv(probs, gold, fixed_n, Waves(fixed_n, 1), StoppingRule("never"), abstain=True)
    fixed_utility = fixed.credit.mean() - weight * cost * fixed_n
    good = np.flatnonzero(utility >= max(utility.max(), fixed_utility) - tolerance - 1e-9)
    if not len(good):
        return None
    i = int(good[np.argmin([candidates[j][2].completions.mean() for j in good])])
    rule, cap, value = candidates[i]
    return SequentialChoice(rule, int(cap), float(utility[i]), float(value.credit.mean()),
                            float(value.completions.mean()), float(value.waves.mean()), float(fixed_utility))


def sequential_bon(values: np.ndarray, probs: np.ndarray, n_max: int, waves: Waves,
                   threshold: float) -> SequentialValue:
    """Exact expected utility of the chosen completion, completions and waves of a best-of-N arm drawn
    in waves that stops at a wave's end once some completion's utility (the tier's weighted score)
    reaches `threshold`; per query.

    values: (R, M) utility of each of a query's M outcomes, probs: (R, M) their chances. Paths still
    drawing at a wave's end e have every earlier draw below the threshold; they stop there when one of
    the wave's draws reaches it (the chosen one is then the wave's best), and the last wave takes the
    best of everything (the earlier draws, all below the threshold, and the last wave's)."""
    values, probs = np.asarray(values, dtype=float), np.asarray(probs, dtype=float)
    order = np.argsort(values, axis=1)
    u = np.take_along_axis(values, order, axis=1)
    cdf = np.clip(np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1), 0.0, 1.0)
    before = np.hstack([np.zeros((len(u), 1)), cdf[:, :-1]])  # F(x−)
    high = u >= threshold
    below = np.where(high, 0.0, probs[np.arange(len(u))[:, None], order]).sum(axis=1)  # P(one draw < threshold)
    ends = waves.ends(n_max)
    credit, completions, wave_count = (np.zeros(len(u)) for _ in range(3))
    start = 0
    for k, end in enumerate(ends, start=1):
        width = int(end) - start
        reach = below ** start  # every earlier draw below the threshold
        if end < n_max:
            credit += reach * np.sum(np.where(high, u * (cdf ** width - before ** width), 0.0), axis=1)
            stop = reach * (1 - below ** width)
        else:  # the last wave: the best of all draws, the earlier ones below the threshold
            capped, capped_before = np.minimum(cdf, below[:, None]), np.minimum(before, below[:, None])
            credit += np.sum(u * (capped ** start * cdf ** width - capped_before ** start * before ** width), axis=1)
            stop = reach
        completions += int(end) * stop
        wave_count += k * stop
        start = int(end)
    return SequentialValue(credit, completions, wave_count)


def brute_force_bon(values: np.ndarray, probs: np.ndarray, n_max: int, waves: Waves,
                    threshold: float) -> tuple[float, float, float]:
    """`sequential_bon` for one query by enumerating every sequence of n_max draws (tests only)."""
    M = len(probs)
    seqs = np.indices((M,) * n_max).reshape(n_max, -1).T
    weight = np.prod(np.asarray(probs)[seqs], axis=1)
    drawn = np.asarray(values)[seqs]
    stopped_at, wave_no = np.full(len(seqs), n_max), np.full(len(seqs), len(waves.ends(n_max)))
    open_ = np.ones(len(seqs), dtype=bool)
    for w, m in enumerate(waves.ends(n_max), start=1):
        stop = open_ & ((drawn[:, :m].max(axis=1) >= threshold) | (m == n_max))
        stopped_at[stop], wave_no[stop] = m, w
        open_ &= ~stop
    best = np.array([row[:m].max() for row, m in zip(drawn, stopped_at)])
    return float(weight @ best), float(weight @ stopped_at), float(weight @ wave_no)


def reached(utilities: np.ndarray, drawn: int, n_max: int, threshold: float) -> bool:
    """Serving's check for best-of-N waves: has a completion's utility reached the threshold (or N_max)?"""
    return drawn >= n_max or bool(np.any(np.asarray(utilities, dtype=float) >= threshold))
