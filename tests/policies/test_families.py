"""The environment family: generators' shapes, exact arm values against brute force, resamples."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from policies.environments import MVEnvironment
from policies.families import FamilySpec, heldout_like, resample_mv, skill_for_accuracy, sigmoid, synthetic_family_mv
from policies.utility import mv_credit


def brute_credit(probs: np.ndarray, gold: int, n: int) -> float:
    """Expected vote credit (ties split) of n i.i.d. draws, by listing every sequence."""
    total = 0.0
    for seq in itertools.product(range(len(probs)), repeat=n):
        counts = np.bincount(seq, minlength=len(probs))
        order = [gold] + [c for c in range(len(probs)) if c != gold]
        total += np.prod(probs[list(seq)]) * float(mv_credit(counts[order]))
    return total


SMALL = FamilySpec(n_prompts=3, n_queries=4, n_classes=3, deceptive=1, gap=0.3)


def test_exact_values_of_a_small_member_match_enumeration():
    env = synthetic_family_mv(SMALL, seed=1)
    env = MVEnvironment(env.name, env.answer_probs, env.gold, env.cost, n_max=5)
    credit = env.credit()
    for p, x in itertools.product(range(3), range(4)):
        for n in range(1, 6):
            assert credit[p, x, n - 1] == pytest.approx(brute_credit(env.answer_probs[p, x], int(env.gold[x]), n),
                                                        abs=1e-12)


@pytest.mark.parametrize("spec", [FamilySpec(), FamilySpec(n_prompts=10, n_classes=2, gap=0.5),
                                  FamilySpec(n_prompts=40, n_queries=100, n_classes=10, deceptive=5)])
def test_members_are_valid_distributions_and_seeded(spec):
    env = synthetic_family_mv(spec, seed=3)
    assert env.answer_probs.shape == (spec.n_prompts, spec.n_queries, spec.n_classes)
    assert env.answer_probs.sum(axis=2) == pytest.approx(np.ones((spec.n_prompts, spec.n_queries)))
    assert (env.answer_probs >= 0).all() and ((0 <= env.gold) & (env.gold < spec.n_classes)).all()
    assert ((0.005 <= env.cost) & (env.cost <= 0.010)).all()
    again = synthetic_family_mv(spec, seed=3)
    assert np.array_equal(env.answer_probs, again.answer_probs) and np.array_equal(env.gold, again.gold)
    assert not np.array_equal(env.answer_probs, synthetic_family_mv(spec, seed=4).answer_probs)


def test_deceptive_prompts_lead_at_one_draw_and_fall_behind_when_voted():
    spec = FamilySpec(n_prompts=12, n_queries=400, n_classes=5, deceptive=3, mix=(0.3, 0.6, 0.1), distractor=2.0)
    env = synthetic_family_mv(spec, seed=0)
    credit = env.credit().mean(axis=1)  # (P, n_max)
    confident = np.argsort(-credit[:, 0])[:3]
    gain = credit[:, 31] - credit[:, 0]
    assert gain[confident].max() < np.median(gain)  # voting helps the confident prompts least
    assert credit[:, 31].argmax() not in confident


def test_skills_hit_their_target_accuracy():
    beta = np.random.default_rng(0).normal(size=500)
    target = np.array([0.3, 0.6, 0.9])
    alpha = skill_for_accuracy(target, beta, scale=2.0)
    assert sigmoid(alpha[:, None] + 2.0 * beta[None, :]).mean(axis=1) == pytest.approx(target, abs=1e-6)


def test_gap_sets_how_close_the_best_prompts_are():
    def top_two(gap):
        env = synthetic_family_mv(FamilySpec(n_prompts=16, n_queries=300, gap=gap, interaction=0.0), seed=5)
        acc = np.sort(env.answer_probs[:, np.arange(300), env.gold].mean(axis=1))[::-1]
        return acc[0] - acc[1]
    assert top_two(0.02) < 0.01 < 0.04 < top_two(0.5)


def test_resample_keeps_the_recorded_rows_it_picks():
    base = synthetic_family_mv(FamilySpec(n_prompts=8, n_queries=50), seed=2)
    sub = resample_mv(base, seed=1, n_prompts=5, n_queries=20)
    assert sub.answer_probs.shape == (5, 20, base.answer_probs.shape[2])
    # locate every (prompt, query) of the resample in the base task: one distinct source each
    match = (sub.answer_probs[:, :, None, None, :] == base.answer_probs[None, None]).all(axis=-1)  # (5, 20, 8, 50)
    prompts = np.array([np.flatnonzero(match[p].any(axis=2).all(axis=0))[0] for p in range(5)])
    queries = np.array([np.flatnonzero(match[0, x, prompts[0]])[0] for x in range(20)])
    assert len(set(prompts)) == 5 and len(set(queries)) == 20
    assert sub.cost == pytest.approx(base.cost[prompts]) and np.array_equal(sub.gold, base.gold[queries])
    assert sub.credit() == pytest.approx(base.credit()[np.ix_(prompts, queries)])


def test_heldout_stand_in_has_the_described_shape():
    env = heldout_like(0)
    assert env.answer_probs.shape == (48, 1500, 4)
    accuracy = env.answer_probs[:, np.arange(1500), env.gold].mean(axis=1)
    assert 0.4 < accuracy.min() and accuracy.max() < 0.9
    assert env.tier_cost_weight == (0.0, 0.2, 1.0) and env.n_max == 32
