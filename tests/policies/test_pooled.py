"""Pooled plug-in estimates: vote and best-of curves against enumeration, pooling per query, PSST's pulls."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from policies.pooled import PooledEstimates, plugin_vote_credit
from policies.psst import PSST, Context, Outcome
from policies.utility import mv_credit


def enumerate_vote(probs: list[float], n: int, never_votes: int | None = None) -> float:
    """Expected credit of n i.i.d. draws over classes (gold = 0) by listing every sequence."""
    total = 0.0
    for seq in itertools.product(range(len(probs)), repeat=n):
        mass = np.prod([probs[c] for c in seq])
        counts = np.bincount([c for c in seq if c != never_votes], minlength=len(probs))
        if never_votes is not None:
            counts = np.delete(counts, never_votes)
        total += mass * float(mv_credit(counts))
    return total


@pytest.mark.parametrize("counts,missing", [([2, 1], 0), ([2, 1], 1), ([1, 2, 1], 0), ([3, 0, 1], 2), ([0, 2], 0)])
def test_plugin_vote_credit_matches_enumeration(counts, missing):
    m = sum(counts) + missing
    probs = [c / m for c in counts] + ([missing / m] if missing else [])
    curve = plugin_vote_credit(np.array([counts]), np.array([missing]), 5)[0]
    for n in range(1, 6):
        expected = enumerate_vote(probs, n, never_votes=len(counts) if missing else None)
        assert curve[n - 1] == pytest.approx(expected, abs=1e-12)


def test_only_missing_answers_earn_nothing():
    assert plugin_vote_credit(np.array([[0, 0]]), np.array([3]), 4).tolist() == [[0.0] * 4]


def estimates(cost_weights=(0.0,), n_prompts=1, n_max=6):
    return PooledEstimates(np.ones((len(cost_weights), 1)), np.array(cost_weights, dtype=float), n_prompts, n_max)


def test_pulls_on_one_query_pool_and_text_answers_keep_their_class():
    est = estimates()
    est.add_mv(0, ["q1", "q2"], [["7", "5"], ["7"]], ["7", "7"], np.zeros((2, 1)))
    est.add_mv(0, ["q1"], [["5", "9", None]], ["7"], np.zeros((1, 3)))
    assert len(est.rows) == 2
    row = est.rows[(0, "q1")]
    assert est.counts[row].tolist()[:3] == [1, 2, 1]  # gold "7", then "5" twice, then "9"
    assert est.missing[row] == 1
    # value at n=1 is the mean over queries of the pooled plug-in accuracy: q1 1/5, q2 1
    assert est.mean()[0, 0, 0] == pytest.approx((1 / 5 + 1.0) / 2)


def test_pulls_without_a_query_are_rows_of_their_own():
    est = estimates()
    est.add_mv(0, [None, None], [np.array([0, 0]), np.array([1, 1])], [0, 0], np.zeros((2, 2)))
    assert len(est.rows) == 2
    assert est.mean()[0, 0, 0] == pytest.approx(0.5)
    assert est.stderr()[0, 0, 0] == pytest.approx(0.5)


def test_cost_term_is_lambda_times_n_times_mean_cost():
    est = estimates(cost_weights=(0.0, 2.0))
    est.add_mv(0, ["q"], [np.array([0, 0, 0, 0])], [0], np.array([[0.01, 0.03, 0.02, 0.02]]))
    mean = est.mean()
    n = np.arange(1, 7)
    assert mean[0, 0] == pytest.approx(np.ones(6))
    assert mean[1, 0] == pytest.approx(1.0 - 2.0 * 0.02 * n)


def test_bon_curve_is_expected_max_of_draws_with_replacement():
    est = PooledEstimates(np.array([[1.0, 0.0], [0.5, 0.5]]), np.zeros(2), 1, 3)
    scores = np.array([[[0.2, 0.9], [0.7, 0.1], [0.4, 0.4], [0.9, 0.0]]])  # one pull of 4 on one query
    est.add_bon(0, ["q"], scores, np.zeros((1, 4)))
    for c, w in enumerate(([1.0, 0.0], [0.5, 0.5])):
        u = scores[0] @ np.array(w)
        for n in (1, 2, 3):
            brute = np.mean([max(u[list(idx)]) for idx in itertools.product(range(4), repeat=n)])
            assert est.mean()[c, 0, n - 1] == pytest.approx(brute)


def test_psst_pulls_one_size_and_values_every_scale():
    trainer = PSST(prompts=["a", "b"], n_max=32, contexts={"only": Context((1.0,), 0.0)}, budget=2000, seed=0,
                   n_queries=500)
    batch = trainer.ask()
    assert {n for _, n in batch} == {4}  # enough fresh queries: the smallest pull (4 with shrunk curves)
    plug_in = PSST(prompts=["a", "b"], n_max=32, contexts={"only": Context((1.0,), 0.0)}, budget=2000, seed=0,
                   n_queries=500, shrink=False)
    assert {n for _, n in plug_in.ask()} == {8}  # plug-in curves need larger pools
    best_of_n = PSST(prompts=["a", "b"], n_max=32, contexts={"only": Context((1.0,), 0.0)}, budget=2000, seed=0,
                     n_queries=500, aggregator="bon")
    assert {n for _, n in best_of_n.ask()} == {8}  # shrinkage models vote curves only: best-of-N keeps 8
    rng = np.random.default_rng(0)
    trainer.tell([(pull[0], pull[1], Outcome(costs=np.full(pull[1], 0.01), gold=1, query=pull.query,
                                             answers=(rng.random(pull[1]) < 0.6).astype(int)))
                  for pull in batch])
    assert np.isfinite(trainer.estimates.mean()).all()  # n above the pull is valued too


def test_psst_pulls_grow_when_the_queries_run_out():
    trainer = PSST(prompts=["a", "b"], n_max=32, contexts={"only": Context((1.0,), 0.0)}, budget=2000, seed=0,
                   n_queries=50)
    batch = trainer.ask()
    sizes = {n for _, n in batch}
    assert len(sizes) == 1 and 8 < sizes.pop() <= 32
    per_prompt = [sum(1 for pull in batch if pull[0] == p) for p in ("a", "b")]
    assert max(per_prompt) <= 50  # one pull per prompt and query at most
    assert trainer.spent <= 2000


def test_pull_size_needs_the_pooled_estimator():
    with pytest.raises(ValueError, match="pull_size"):
        PSST(prompts=["a"], n_max=8, contexts={"only": Context((1.0,), 0.0)}, budget=100, estimator="subset",
             pull_size=4)


def test_pooled_psst_halves_prompts_and_keeps_their_scales_until_the_end():
    contexts = {"free": Context((1.0,), 0.0), "dear": Context((1.0,), 5.0)}
    trainer = PSST(prompts=[f"p{i}" for i in range(8)], n_max=16, contexts=contexts, budget=3000, seed=0,
                   n_queries=40)
    assert trainer.rounds == 3  # ⌈log2 8⌉ prompts, not ⌈log2 128⌉ arms
    rng = np.random.default_rng(0)
    accuracy = {f"p{i}": 0.1 * i + 0.1 for i in range(8)}

    def tell(batch):
        trainer.tell([(pull[0], pull[1], Outcome(costs=np.full(pull[1], 0.01), gold=1, query=pull.query,
                                                 answers=(rng.random(pull[1]) < accuracy[pull[0]]).astype(int)))
                      for pull in batch])

    tell(trainer.ask())
    alive = trainer.active.any(axis=2)
    assert alive.sum(axis=1).tolist() == [4, 4]
    assert (trainer.active.sum(axis=2)[alive] == 16).all()  # every N of a kept prompt stays a candidate
    while batch := trainer.ask():
        tell(batch)
    assert trainer.spent <= 3000
    assert trainer.active.reshape(2, -1).sum(axis=1).tolist() == [1, 1]
    policy = trainer.policy()
    assert policy["free"][0] == policy["dear"][0] == "p7"
    assert policy["dear"][1] < policy["free"][1]


def test_uncertainty_is_largest_on_queries_where_the_active_prompts_answers_are_split():
    """Two prompts on six queries: unanimous gold on three, votes split between gold and one wrong
    answer on the others. The summed posterior variance at each prompt's best N ranks the split ones
    first; only active prompts count; plug-in curves have no posterior."""
    def fill(est):
        for p in range(2):
            for x in range(6):
                answers = np.zeros(8, dtype=int) if x < 3 else np.array([0, 1] * 4)
                est.add_mv(p, [f"q{x}"], [answers], [0], np.zeros((1, 8)))
    est = PooledEstimates(np.array([[1.0]]), np.array([0.0]), 2, 16, shrink="soft")
    fill(est)
    alive, best = np.ones((1, 2), dtype=bool), np.full((1, 2), 15)  # both prompts at N = 16
    spread = est.uncertainty(alive, best)
    order = [est.queries[f"q{x}"] for x in range(6)]
    assert spread.shape == (6,) and (spread >= 0).all()
    assert spread[order[3:]].min() > 2 * spread[order[:3]].max()
    assert (est.uncertainty(np.array([[True, False]]), best) < spread).all()  # a dropped prompt no longer counts
    assert not np.allclose(est.uncertainty(alive, np.zeros((1, 2), dtype=int)), spread)  # read at each prompt's N
    plugin = PooledEstimates(np.array([[1.0]]), np.array([0.0]), 2, 16, shrink=False)
    fill(plugin)
    assert plugin.uncertainty(alive, best) is None
