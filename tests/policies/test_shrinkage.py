"""Empirical-Bayes vote curves: exact atom likelihoods, EM, per-prompt pooling, bias against plug-in."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from policies.environments import mv_vote_credit
from policies.pooled import PooledEstimates, plugin_vote_credit
from policies.shrinkage import Shrinkage, atom_credit, atom_grid, atom_loglik, fit_prior


def brute_loglik(counts: list[int], probs: np.ndarray) -> float:
    """log Σ over injective maps of the observed wrong answers to wrong classes of Π p^c (gold = class 0)."""
    gold, wrong = counts[0], [c for c in counts[1:] if c > 0]
    total = 0.0
    for classes in itertools.permutations(range(1, len(probs)), len(wrong)):
        total += np.prod([probs[k] ** c for k, c in zip(classes, wrong)])
    return float(np.log(probs[0] ** gold * total)) if total > 0 and (gold == 0 or probs[0] > 0) else -np.inf


@pytest.mark.parametrize("n_classes", [2, 3, 5])
def test_atom_loglik_is_exact_for_unlabelled_wrong_answers(n_classes):
    atoms = atom_grid(n_classes)
    rows = [[3, 0, 0, 0], [1, 2, 0, 0], [0, 1, 1, 0], [2, 1, 1, 1], [0, 4, 0, 0], [0, 0, 0, 0]]
    rows = [r[: 1 + n_classes - 1] for r in rows]
    ll = atom_loglik(np.array(rows), n_classes)
    for a, (g, t, u) in enumerate(atoms):
        probs = np.array([g, t] + [u] * (n_classes - 2))
        for r, row in enumerate(rows):
            assert ll[r, a] == pytest.approx(brute_loglik(row, probs), abs=1e-9) or (
                np.isinf(ll[r, a]) and np.isinf(brute_loglik(row, probs)))


def test_atoms_are_distributions_with_the_dominant_wrong_answer_largest():
    for n_classes in (2, 4, 10):
        atoms = atom_grid(n_classes)
        total = atoms[:, 0] + atoms[:, 1] + (n_classes - 2) * atoms[:, 2]
        assert total == pytest.approx(np.ones(len(atoms)))
        assert (atoms[:, 1] >= atoms[:, 2] - 1e-12).all()
        assert np.isclose(atoms[:, 0], 0.98, atol=0.01).any()  # fine near 1: no invented voting gains


def test_atom_credit_is_the_exact_vote_credit_of_each_atom():
    atoms = atom_grid(4)
    credit = atom_credit(4, 7)
    probs = np.concatenate([atoms[:, :2], np.repeat(atoms[:, 2:], 2, axis=1)], axis=1)
    assert credit == pytest.approx(mv_vote_credit(probs, np.zeros(len(probs), dtype=int), 7))


def test_em_never_lowers_the_likelihood_and_keeps_groups_apart():
    rng = np.random.default_rng(0)
    lik = rng.random((40, 6))
    group = np.repeat([0, 1], 20)
    mult = rng.integers(1, 4, size=40).astype(float)
    start = np.full((2, 6), 1 / 6)
    loglik = lambda w: float((mult * np.log((lik * w[group]).sum(axis=1))).sum())
    previous = loglik(start)
    w = start
    for _ in range(5):
        w = fit_prior(lik, mult, group, 2, w, steps=3)
        assert loglik(w) >= previous - 1e-12
        previous = loglik(w)
    assert w.sum(axis=1) == pytest.approx([1.0, 1.0])
    anchored = fit_prior(lik, mult, group, 2, start, steps=50, anchor=np.eye(6)[0], kappa=1e12)
    assert anchored == pytest.approx(np.tile(np.eye(6)[0], (2, 1)), abs=1e-6)  # κ → ∞: the anchor


def test_a_point_prior_gives_that_atoms_curve_and_level_keeps_the_rows_own_accuracy():
    shrink = Shrinkage(1, 9, kappa=0.0, level=False)
    counts = np.array([[3, 1, 0], [0, 2, 2]])
    shrink.curves(np.zeros(2, dtype=int), counts, 3)  # builds the atoms and caches
    atom = 17
    shrink.prior[:] = np.eye(shrink.prior.shape[1])[atom]
    shrink.common[:] = shrink.prior[:1]
    shrink.fixed_kappa, shrink.kappa = 1e12, np.full(1, 1e12)
    curves = shrink.curves(np.zeros(2, dtype=int), counts, 3)
    assert curves == pytest.approx(np.tile(shrink.credit[atom], (2, 1)))
    shrink.level = True
    leveled = shrink.curves(np.zeros(2, dtype=int), counts, 3)
    assert leveled[:, 0].mean() == pytest.approx((0.75 + 0.0) / 2)  # the prompt's observed accuracy
    assert leveled - curves == pytest.approx(np.full_like(curves, leveled[0, 0] - curves[0, 0]))  # one shift


def steady_and_confident(rng, queries=600, m=8):
    """Prompt 0 steady (gold 0.55, wrong spread over 4), prompt 1 confident (right 0.97 / wrong 0.03)."""
    steady = np.tile([0.55, 0.15, 0.15, 0.15], (queries, 1))
    right = rng.random(queries) < 0.8
    confident = np.where(right[:, None], [0.97, 0.01, 0.01, 0.01], [0.03, 0.95, 0.01, 0.01])
    probs = np.stack([steady, confident])
    draws = np.stack([[rng.choice(4, size=m, p=probs[p, x]) for x in range(queries)] for p in range(2)])
    return probs, draws


def test_shrinkage_removes_most_of_the_plugin_bias_against_steady_prompts():
    rng = np.random.default_rng(3)
    probs, draws = steady_and_confident(rng)
    truth = mv_vote_credit(probs.reshape(-1, 4), np.zeros(2 * probs.shape[1], dtype=int), 32).reshape(2, -1, 32).mean(1)
    errors = {}
    for shrink in (False, True):
        est = PooledEstimates(np.ones((1, 1)), np.zeros(1), 2, 32, shrink=shrink)
        for p in range(2):
            est.add_mv(p, list(range(draws.shape[1])), list(draws[p]), [0] * draws.shape[1], np.zeros(draws.shape[1:]))
        errors[shrink] = est.mean()[0] - truth
    assert abs(errors[False][0, 31]) > 0.08  # plug-in from 8 draws: the steady prompt looks far worse at n = 32
    assert abs(errors[True][0, 31]) < 0.4 * abs(errors[False][0, 31])
    assert np.abs(errors[True][1]).max() < 0.02  # and the confident prompt stays right
    assert errors[True][:, 0] == pytest.approx(errors[False][:, 0])  # level: n = 1 is the plug-in's (unbiased)


def test_prompts_with_different_shapes_keep_their_own_priors_alike_ones_share():
    rng = np.random.default_rng(4)
    _, draws = steady_and_confident(rng, queries=400)
    shrink = Shrinkage(2, 16)
    counts = lambda d: np.stack([(d == k).sum(axis=1) for k in range(4)], axis=1)
    rows = np.concatenate([counts(draws[0]), counts(draws[1])])
    shrink.curves(np.repeat([0, 1], 400), rows, 4)
    assert (shrink.kappa <= 10).all()  # a steady and a confident prompt: each its own
    alike = Shrinkage(2, 16)
    half = counts(draws[0])
    alike.curves(np.repeat([0, 1], 200), np.concatenate([half[:200], half[200:]]), 4)
    assert (alike.kappa >= 10).all() and alike.kappa.max() >= 30  # two halves of one prompt's rows: shared


def test_plugin_and_shrinkage_agree_on_rows_that_leave_no_doubt():
    est = PooledEstimates(np.ones((1, 1)), np.zeros(1), 1, 8, shrink=True)
    est.add_mv(0, list(range(50)), [np.zeros(8, dtype=int)] * 50, [0] * 50, np.zeros((50, 8)))
    assert est.mean()[0, 0] == pytest.approx(plugin_vote_credit(np.array([[8, 0]]), np.zeros(1), 8)[0], abs=2e-3)


def test_psst_with_shrinkage_runs_on_text_answers_within_budget():
    from policies.psst import PSST, Context, Outcome

    rng = np.random.default_rng(5)
    accuracy = {"a": 0.3, "b": 0.5, "c": 0.7, "d": 0.45}
    trainer = PSST(prompts=list(accuracy), n_max=16, contexts={"free": Context((1.0,), 0.0), "dear": Context((1.0,), 2.0)},
                   budget=1500, seed=1, n_queries=60, shrink=True)
    while batch := trainer.ask():
        trainer.tell([(p, n, Outcome(costs=np.full(n, 0.01), gold="42", query=pull.query,
                                     answers=["42" if rng.random() < accuracy[p] else str(rng.integers(3)) for _ in range(n)]))
                      for pull in batch for p, n in [pull]])
    assert trainer.spent <= 1500 and trainer.finished
    policy = trainer.policy()
    assert policy["free"][0] == "c" and 1 <= policy["dear"][1] <= policy["free"][1]
    assert np.isfinite(trainer.estimates.mean()[:, 2]).all()


def shared_difficulty(rng, queries=300, draws=4):
    """Five prompts on queries of varied difficulty: four follow it, the last does the opposite."""
    ease = rng.beta(0.7, 0.5, size=queries)
    gold_rate = np.stack([np.clip(ease + shift, 0, 1) for shift in (0.03, -0.03, 0.0, -0.06)] + [1 - ease])
    gold = rng.random((5, queries, draws)) < gold_rate[:, :, None]
    counts = np.stack([gold.sum(axis=2), draws - gold.sum(axis=2)], axis=2)  # (P, X, 2): gold, one wrong answer
    return counts


def test_prompts_that_follow_the_others_on_each_query_are_tilted_a_contrary_one_is_not():
    counts = shared_difficulty(np.random.default_rng(6))
    P, X, _ = counts.shape
    rows = counts.reshape(P * X, 2)
    on_query = counts.sum(axis=0)  # (X, 2)
    others = np.tile(on_query, (P, 1)) - rows
    shrink = Shrinkage(P, 16)
    shrink.curves(np.repeat(np.arange(P), X), rows, 2, others)
    assert (shrink.tilt[:4] > 0).all()  # the others' answers predict theirs
    assert shrink.tilt[4] == 0  # the contrary prompt keeps its own prior
    untilted = Shrinkage(P, 16)
    untilted.curves(np.repeat(np.arange(P), X), rows, 2)
    assert (untilted.tilt == 0).all()


def test_a_rows_curve_moves_with_what_the_other_prompts_answered_on_its_query():
    counts = shared_difficulty(np.random.default_rng(7))
    est = PooledEstimates(np.ones((1, 1)), np.zeros(1), 5, 16, shrink="soft")
    for p in range(5):
        answers = [np.repeat([0, 1], row) for row in counts[p]]
        est.add_mv(p, list(range(counts.shape[1])), answers, [0] * counts.shape[1], np.zeros((counts.shape[1], 4)))
    est.mean()
    split = np.flatnonzero((counts[0, :, 0] == 2))  # prompt 0 saw 2 of 4 right on these queries
    others_right = counts[1:4, split, 0].sum(axis=0)  # of 12 draws by the three other followers
    curve = est.curves[0, est.row_prompt == 0][split, 15]
    easy, hard = curve[others_right >= 10], curve[others_right <= 2]
    assert len(easy) and len(hard)
    assert easy.min() > hard.max()  # same own counts: a query the three other followers aced looks better


@pytest.mark.parametrize("query_tilt", [True, False])
def test_rows_with_more_distinct_wrong_answers_than_the_atoms_model_stay_finite(query_tilt):
    """Text answers on a hard query can hold more distinct wrong answers than MAX_CLASSES − 1."""
    rng = np.random.default_rng(0)
    est = PooledEstimates(np.ones((1, 1)), np.zeros(1), 2, 16, shrink="soft", query_tilt=query_tilt)
    for p in range(2):
        answers = [[str(rng.integers(0, 3)) for _ in range(8)] for _ in range(20)]
        answers[0] = [str(i) for i in range(14)]  # gold "0" once, 13 distinct wrong answers
        est.add_mv(p, list(range(20)), answers, ["0"] * 20, np.zeros((20, 8)))
    assert np.isfinite(est.mean()).all()


def test_others_are_the_other_prompts_answers_on_the_same_query_only():
    est = PooledEstimates(np.ones((1, 1)), np.zeros(1), 3, 8, shrink="soft")
    est.add_mv(0, ["x", "y"], [["42", "42", "7"], ["1"]], ["42", "2"], np.zeros((2, 3)))
    est.add_mv(1, ["x", None], [["42", "9"], ["5", "5"]], ["42", "5"], np.zeros((2, 2)))
    est.add_mv(2, ["x"], [["8", None]], ["42"], np.zeros((1, 2)))
    rows = {(p, k): r for (p, k), r in est.rows.items() if not isinstance(k, tuple)}
    others = est._others()
    assert others[rows[(0, "x")]].tolist() == [1, 2]  # prompt 1: 42, 9; prompt 2: 8 (no answer not counted)
    assert others[rows[(1, "x")]].tolist() == [2, 2]
    assert others[rows[(0, "y")]].tolist() == [0, 0]  # nobody else on y
    anonymous = next(r for (p, k), r in est.rows.items() if isinstance(k, tuple))
    assert others[anonymous].tolist() == [0, 0]  # a pull without a query key is a query of its own


def test_pulling_one_prompt_on_a_query_moves_another_prompts_curve_there():
    counts = shared_difficulty(np.random.default_rng(8))
    est = PooledEstimates(np.ones((1, 1)), np.zeros(1), 5, 16, shrink="soft")
    X = counts.shape[1]
    for p in range(4):
        est.add_mv(p, list(range(X)), [np.repeat([0, 1], row) for row in counts[p]], [0] * X, np.zeros((X, 4)))
    est.mean()
    row = est.rows[(0, 0)]
    before = est.curves[0, row].copy()
    est.add_mv(4, [0], [np.ones(12, dtype=int) if counts[0, 0, 0] >= 2 else np.zeros(12, dtype=int)], [0],
               np.zeros((1, 12)))  # 12 draws on query 0 against what prompt 0 saw there
    est.mean()
    assert np.abs(est.curves[0, row] - before).max() > 1e-3


def test_the_posterior_variance_of_a_rows_credit_is_the_priors_without_data_and_shrinks_with_draws():
    shrink = Shrinkage(1, 9, level=False)
    counts = np.array([[3, 1, 0], [0, 0, 0], [40, 0, 0], [2, 2, 0]])  # row 1 has no valid answer
    shrink.curves(np.zeros(4, dtype=int), counts, 3)
    prior = shrink.prior[0]
    spread = prior @ shrink.credit**2 - (prior @ shrink.credit) ** 2
    assert shrink.variance.shape == (4, 9) and (shrink.variance >= 0).all()
    assert shrink.variance[1] == pytest.approx(spread)  # no data: the posterior is the prior
    assert shrink.variance[2].max() < 0.1 * shrink.variance[3].max()  # 40 agreeing draws leave little doubt
    shrink.fixed_kappa, shrink.kappa = 1e12, np.full(1, 1e12)  # a point prior leaves none
    shrink.prior[:] = np.eye(shrink.prior.shape[1])[17]
    shrink.common[:] = shrink.prior[:1]
    shrink.curves(np.zeros(4, dtype=int), counts, 3)
    assert shrink.variance == pytest.approx(np.zeros((4, 9)), abs=1e-12)
