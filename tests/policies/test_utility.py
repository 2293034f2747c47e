"""Utilities, aggregation and exact values against hand-computed and brute-force references."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from policies.aggregate import AnswerExtractor, best_of_n, majority_vote
from policies.budget import clamp_n
from policies.environments import mv_vote_credit
from policies.utility import answers_to_counts, bon_utility, mv_credit, mv_utility


@pytest.mark.parametrize("answers, gold, credit", [
    (["4", "4", "5"], "4", 1.0),
    (["4", "5", "5"], "4", 0.0),
    (["4", "5"], "4", 0.5),                  # two-way tie including gold: 1/t
    (["4", "5", "6"], "4", 1 / 3),
    (["4", None, None], "4", 1.0),           # None never votes
    ([None, None], "4", 0.0),                # no answer at all earns nothing
    (["5", "6", None], "4", 0.0),
    (["4", "4", "5", "5", "6", "6"], "4", 1 / 3),
])
def test_mv_credit_hand_cases(answers, gold, credit):
    assert float(mv_credit(answers_to_counts(answers, gold))) == pytest.approx(credit)


def test_mv_and_bon_utility_cost_terms():
    u = mv_utility(np.array(0.5), np.array(0.03), weight=np.array([1.0, 1.0, 0.5]), cost_weight=np.array([0.0, 0.2, 1.0]))
    assert u == pytest.approx([0.5, 0.5 - 0.006, 0.25 - 0.03])
    scores = np.array([[0.2, 0.9], [0.8, 0.1]])
    u = bon_utility(scores, costs=np.array([0.01, 0.02]), weights=np.array([[1.0, 0.0], [0.0, 1.0]]),
                    cost_weights=np.array([0.0, 1.0]))
    assert u == pytest.approx([0.8, 0.9 - 0.03])


def test_exact_vote_credit_matches_enumeration():
    rng = np.random.default_rng(4)
    probs = rng.dirichlet(np.ones(4), size=3)
    gold = np.array([0, 2, 3])
    exact = mv_vote_credit(probs, gold, 5)
    for b in range(3):
        for n in range(1, 6):
            total = 0.0
            for seq in itertools.product(range(4), repeat=n):
                counts = np.bincount(seq, minlength=4)
                total += np.prod(probs[b, list(seq)]) * float(mv_credit(counts, gold_column=gold[b]))
            assert exact[b, n - 1] == pytest.approx(total, abs=1e-12)


@pytest.mark.parametrize("text, answer", [
    (r"so x = 3. Final answer: \boxed{3}", "3"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"first \boxed{2}, corrected: \boxed{ 7 }", "7"),
    ("The final answer is: 42.", "42"),
    ("Final answer: $x^2$", "x^2"),
    ("no answer here", None),
    ("", None),
])
def test_default_extractor(text, answer):
    assert AnswerExtractor()(text) == answer


def test_custom_extractor_and_normalisation():
    assert AnswerExtractor(pattern=r"ANSWER=(\w+)")("ANSWER=Paris") == "paris"
    assert AnswerExtractor(pattern=r"ANSWER=(\w+)", normalize=False)("ANSWER=Paris") == "Paris"


def test_majority_vote_breaks_ties_at_random_and_records_tie_size():
    rng = np.random.default_rng(0)
    picks = [majority_vote(["a", "b", "a", "b", None], rng) for _ in range(400)]
    assert {p.tie_size for p in picks} == {2}
    share_a = np.mean([p.answer == "a" for p in picks])
    assert 0.4 < share_a < 0.6
    assert all(p.vote_share == pytest.approx(0.4) for p in picks)
    vote = majority_vote(["x", "y", "y"], rng)
    assert (vote.answer, vote.index, vote.tie_size) == ("y", 1, 1)
    assert majority_vote([None, None], rng).answer is None


def test_best_of_n_uses_weights():
    scores = np.array([[0.9, 0.1], [0.4, 0.8], [0.5, 0.5]])
    rng = np.random.default_rng(0)
    assert best_of_n(scores, np.array([1.0, 0.0]), rng) == 0
    assert best_of_n(scores, np.array([0.2, 0.8]), rng) == 1


def test_best_of_n_ranks_a_nan_score_below_every_number():
    rng = np.random.default_rng(0)
    scores = np.array([[0.5], [np.nan], [0.2]])  # a reward model answered NaN for the second
    assert all(best_of_n(scores, np.array([1.0]), rng) == 0 for _ in range(5))
    assert best_of_n(np.full((3, 1), np.nan), np.array([1.0]), rng) in (0, 1, 2)


@pytest.mark.parametrize("n, kwargs, expected", [
    (32, dict(route_n_max=32, tier_max_n=8, max_cost_per_request=None, worst_cost_per_completion=0.01), 8),
    (32, dict(route_n_max=16, tier_max_n=None, max_cost_per_request=None, worst_cost_per_completion=0.01), 16),
    (32, dict(route_n_max=32, tier_max_n=None, max_cost_per_request=0.05, worst_cost_per_completion=0.012), 4),
    (3, dict(route_n_max=32, tier_max_n=None, max_cost_per_request=0.001, worst_cost_per_completion=0.012), 1),
])
def test_clamp_n(n, kwargs, expected):
    assert clamp_n(n, **kwargs) == expected
