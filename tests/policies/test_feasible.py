"""Per-context feasible arms (a tier's largest N per prompt) and the ranked list of a context's arms."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from policies.baselines import UCB, PromptThenN, SequentialHalving, Uniform
from policies.psst import PSST, Context, Outcome, RankedArm, TopK

PROMPTS = ["a", "b", "c", "d"]
ACCURACY = {"a": 0.35, "b": 0.45, "c": 0.75, "d": 0.2}
COST = {"a": 0.01, "b": 0.02, "c": 0.015, "d": 0.005}


def contexts():
    return {"free": Context((1.0,), 0.0), "dear": Context((1.0,), 2.0)}


def sampler(rng, accuracy=ACCURACY):
    def sample(pull):
        prompt_id, n = pull
        correct = rng.random(n) < accuracy[prompt_id]
        return prompt_id, n, Outcome(costs=np.full(n, COST.get(prompt_id, 0.01)), gold=0, query=pull.query,
                                     answers=np.where(correct, 0, rng.integers(1, 4, size=n)))
    return sample


def drive(trainer, sample):
    batches = []
    while batch := trainer.ask():
        batches.append(batch)
        trainer.tell([sample(pull) for pull in batch])
    return batches


FEASIBLE = {"free": {"c": 3}, "dear": {"a": 2, "b": 1}}  # c ≤ 3 when free (≤ 16 when dear), ...


@pytest.mark.parametrize("options", [{}, {"estimator": "subset"}, {"estimator": "block"},
                                     {"screening": TopK(2, n=4)}, {"halve_prompts": False}])
def test_arms_above_the_feasible_n_are_never_planned_chosen_or_ranked(options):
    for seed in range(3):
        trainer = PSST(prompts=PROMPTS, n_max=16, contexts=contexts(), budget=4000, seed=seed, n_queries=60,
                       feasible=FEASIBLE, **options)
        assert trainer.active[0, 2].tolist() == [True] * 3 + [False] * 13
        assert trainer.active[1, 0].sum() == 2 and trainer.active[1, 1].sum() == 1 and trainer.active[1, 2].all()
        batches = drive(trainer, sampler(np.random.default_rng(seed)))
        largest = {"a": 16, "b": 16, "c": 16, "d": 16}  # a, b, c are feasible to 16 in one context or the other
        assert all(n <= largest[p] for b in batches for p, n in b)
        assert not (trainer.active & ~trainer.feasible).any()
        for context, arms in FEASIBLE.items():
            prompt_id, n = trainer.policy()[context]
            assert n <= arms.get(prompt_id, 16)
            for arm in trainer.ranked(context, per_n=4):
                assert arm.n <= arms.get(arm.prompt_id, 16)


def test_a_prompt_capped_in_one_context_is_still_pulled_large_for_another():
    """Paper mode pulls each prompt at its largest N active in *some* context."""
    trainer = PSST(prompts=PROMPTS, n_max=16, contexts=contexts(), budget=4000, seed=0, estimator="subset",
                   feasible={"free": {"c": 3}, "dear": {"a": 2, "b": 2, "d": 2}})
    first = trainer.ask()
    sizes = {p: n for p, n in first}
    assert sizes == {"a": 16, "b": 16, "c": 16, "d": 16}
    trainer = PSST(prompts=PROMPTS, n_max=16, contexts=contexts(), budget=4000, seed=0, estimator="subset",
                   feasible={"free": {"c": 3}, "dear": {"c": 5}})
    assert {p: n for p, n in trainer.ask()}["c"] == 5


def test_pooled_pulls_never_exceed_a_prompts_largest_feasible_n():
    trainer = PSST(prompts=PROMPTS, n_max=32, contexts=contexts(), budget=3000, seed=0, n_queries=80,
                   feasible={"free": {"d": 2}, "dear": {"d": 1}})
    sizes = {p: n for p, n in trainer.ask()}
    assert sizes["d"] == 2 and sizes["a"] > 2


def test_feasible_is_validated():
    make = lambda feasible: PSST(prompts=PROMPTS, n_max=8, contexts=contexts(), budget=100, feasible=feasible)
    with pytest.raises(ValueError, match="unknown context"):
        make({"nope": {"a": 2}})
    with pytest.raises(ValueError, match="unknown prompt"):
        make({"free": {"z": 2}})
    with pytest.raises(ValueError, match="≥ 1"):
        make({"free": {"a": 0}})
    assert make({"free": {"a": 99}}).feasible[0, 0].all()  # capped at n_max


@settings(max_examples=40, deadline=None)
@given(prompts=st.integers(1, 6), n_max=st.integers(1, 24), budget=st.integers(0, 2500), seed=st.integers(0, 10),
       caps=st.lists(st.integers(1, 30), min_size=12, max_size=12))
def test_feasible_arms_and_budget_hold_for_every_engine(prompts, n_max, budget, seed, caps):
    names = [f"p{i}" for i in range(prompts)]
    ctx = {"c0": Context((1.0,), 0.0), "c1": Context((1.0,), 0.5)}
    feasible = {"c0": {p: caps[i] for i, p in enumerate(names)}, "c1": {p: caps[6 + i] for i, p in enumerate(names)}}
    largest = {p: min(n_max, max(feasible["c0"][p], feasible["c1"][p])) for p in names}
    rng = np.random.default_rng(seed)
    for cls in (PSST, Uniform, SequentialHalving, UCB, PromptThenN):
        trainer = cls(prompts=names, n_max=n_max, contexts=ctx, budget=budget, seed=seed, feasible=feasible,
                      n_queries=20)
        batches = drive(trainer, sampler(rng, {p: 0.5 for p in names}))
        assert sum(n for b in batches for _, n in b) == trainer.spent <= budget
        assert all(n <= largest[p] for b in batches for p, n in b)
        for c, (prompt_id, n) in trainer.policy().items():
            assert 1 <= n <= min(n_max, feasible[c][prompt_id])
            ranked = trainer.ranked(c)
            assert (ranked[0].prompt_id, ranked[0].n) == (prompt_id, n)
            assert all(arm.n <= min(n_max, feasible[c][arm.prompt_id]) for arm in ranked)


def test_ranked_starts_with_the_policy_then_best_per_n_by_value():
    trainer = PSST(prompts=PROMPTS, n_max=8, contexts=contexts(), budget=6000, seed=1, n_queries=80)
    drive(trainer, sampler(np.random.default_rng(1)))
    for context in ("free", "dear"):
        ranked = trainer.ranked(context)
        assert all(isinstance(arm, RankedArm) for arm in ranked)
        assert (ranked[0].prompt_id, ranked[0].n) == trainer.policy()[context]
        rest = [arm.value for arm in ranked[1:]]
        assert rest == sorted(rest, reverse=True)
        assert {arm.n for arm in ranked} == set(range(1, 9))  # the best arm at every N, once each
        assert len({(arm.prompt_id, arm.n) for arm in ranked}) == len(ranked)
        for arm in ranked:
            assert (arm.value, arm.value_se) == pytest.approx(trainer.estimate(context, arm.prompt_id, arm.n))
            assert arm.cost == pytest.approx(arm.n * COST[arm.prompt_id])
        mean = trainer.estimates.mean()[trainer.context_names.index(context)]
        for arm in ranked[1:]:  # each is the best prompt at its N
            assert arm.value == pytest.approx(np.nanmax(mean[:, arm.n - 1]))
    assert trainer.ranked("free")[0].prompt_id == "c"


def test_ranked_puts_the_chosen_survivor_first_even_when_a_dropped_arm_now_looks_better():
    trainer = PSST(prompts=PROMPTS, n_max=8, contexts=contexts(), budget=3000, seed=2, n_queries=80)
    drive(trainer, sampler(np.random.default_rng(2)))
    trainer.active[:] = False
    trainer.active[:, 3, 0] = True  # the survivor is d at N = 1: far from the best estimate
    ranked = trainer.ranked("free", per_n=2)
    assert (ranked[0].prompt_id, ranked[0].n) == ("d", 1) == trainer.policy()["free"]
    assert ranked[1].value > ranked[0].value
    assert [(arm.prompt_id, arm.n) for arm in ranked].count(("d", 1)) == 1  # listed once, first


def test_ranked_before_any_data_has_only_the_policy_arm_with_unknown_value_and_cost():
    trainer = PSST(prompts=PROMPTS, n_max=4, contexts=contexts(), budget=0, feasible={"dear": {"a": 1}})
    ranked = trainer.ranked("dear")
    assert len(ranked) == 1 and (ranked[0].prompt_id, ranked[0].n) == trainer.policy()["dear"]
    assert math.isnan(ranked[0].value) and math.isnan(ranked[0].cost)


def test_ranked_respects_a_context_capped_below_n_max():
    trainer = PSST(prompts=PROMPTS, n_max=8, contexts=contexts(), budget=3000, seed=0, n_queries=80,
                   feasible={"dear": {p: 3 for p in PROMPTS}})
    drive(trainer, sampler(np.random.default_rng(0)))
    assert {arm.n for arm in trainer.ranked("dear")} == {1, 2, 3}
    assert {arm.n for arm in trainer.ranked("free")} == set(range(1, 9))
