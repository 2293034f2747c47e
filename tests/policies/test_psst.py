"""PSST engine: reuse counts, budget, halving, screening, correctness on clear gaps, ask/tell."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from bench.simulate import bon_task, mv_task, run_once
from policies.baselines import UCB, PromptThenN, SequentialHalving, Uniform
from policies.environments import MVEnvironment, synthetic_bon
from policies.estimators import ArmEstimates, encode_answers, max_of_subset_weights
from policies.psst import PSST, Context, Outcome, TopK


def one_context():
    return {"only": Context((1.0,), 0.0)}


@pytest.mark.parametrize("N", [1, 5, 12, 32])
def test_block_reuse_gives_floor_N_over_n_samples_per_scale(N):
    est = ArmEstimates(np.array([[1.0]]), np.array([0.0]), n_prompts=1, n_max=32, mode="block")
    codes = np.zeros((3, N), dtype=int)
    est.add_mv(0, codes, np.zeros((3, N)))
    n = np.arange(1, 33)
    expected = np.where(n <= N, 3 * (N // n), 0)
    assert np.array_equal(est.counts[0], expected)


def test_bon_subset_estimator_equals_mean_over_all_subsets():
    rng = np.random.default_rng(1)
    u = rng.random(7)
    A = max_of_subset_weights(7)
    s = np.sort(u)
    for n in range(1, 8):
        brute = np.mean([max(c) for c in itertools.combinations(u, n)])
        assert s @ A[n - 1] == pytest.approx(brute)
    assert A.sum(axis=1) == pytest.approx(np.ones(7))


def test_mv_subset_estimator_is_unbiased_for_the_subset_average():
    rng = np.random.default_rng(2)
    answers = np.array([0, 0, 1, 2, 0, 1])
    codes = encode_answers(answers, 0)[None, :]
    est = ArmEstimates(np.array([[1.0]]), np.array([0.0]), 1, 6, mode="subset", permutations=4000, rng=rng)
    est.add_mv(0, codes, np.zeros((1, 6)))
    for n in (2, 3, 4):
        subsets = list(itertools.combinations(answers, n))
        exact = 0.0
        for sub in subsets:
            c = np.bincount(sub, minlength=3)
            top = c.max()
            exact += (c[0] == top) / (c == top).sum()
        assert est.mean()[0, 0, n - 1] == pytest.approx(exact / len(subsets), abs=0.02)


def drive(trainer, sample):
    """Run ask/tell to the end with `sample(prompt_id, n) -> Outcome`; returns all batches."""
    batches = []
    while batch := trainer.ask():
        batches.append(batch)
        trainer.tell([(p, n, sample(p, n)) for p, n in batch])
    return batches


def coin_sampler(prompt_accuracy: dict, rng, cost=0.01):
    def sample(prompt_id, n):
        correct = rng.random(n) < prompt_accuracy[prompt_id]
        answers = np.where(correct, 0, rng.integers(1, 4, size=n))
        return Outcome(costs=np.full(n, cost), answers=answers, gold=0)
    return sample


@settings(max_examples=60, deadline=None)
@given(prompts=st.integers(1, 9), n_max=st.integers(1, 40), budget=st.integers(0, 3000),
       contexts=st.integers(1, 4), topk=st.sampled_from([None, 1, 3]), seed=st.integers(0, 10))
def test_budget_is_never_exceeded(prompts, n_max, budget, contexts, topk, seed):
    names = [f"p{i}" for i in range(prompts)]
    ctx = {f"c{i}": Context((1.0,), 0.3 * i) for i in range(contexts)}
    rng = np.random.default_rng(seed)
    for cls in (PSST, Uniform, SequentialHalving, UCB, PromptThenN):
        kwargs = {"screening": TopK(topk)} if cls is PSST and topk else {}
        trainer = cls(prompts=names, n_max=n_max, contexts=ctx, budget=budget, aggregator="mv", seed=seed, **kwargs)
        batches = drive(trainer, coin_sampler({p: 0.5 for p in names}, rng))
        assert sum(n for b in batches for _, n in b) == trainer.spent <= budget
        policy = trainer.policy()
        assert set(policy) == set(ctx)
        assert all(p in names and 1 <= n <= n_max for p, n in policy.values())
        if cls is PSST:
            assert (trainer.active.reshape(contexts, -1).sum(axis=1) >= 1).all()


def test_halving_keeps_at_least_one_arm_and_ends_with_one_per_context():
    trainer = PSST(prompts=["a", "b", "c"], n_max=8, contexts={"x": Context((1.0,), 0.0), "y": Context((1.0,), 5.0)},
                   budget=4000, seed=0)
    drive(trainer, coin_sampler({"a": 0.3, "b": 0.5, "c": 0.7}, np.random.default_rng(0)))
    counts = trainer.active.reshape(2, -1).sum(axis=1)
    assert counts.tolist() == [1, 1]


def test_psst_finds_the_best_arm_per_context_on_a_clear_gap():
    """Prompt c is best; with λ=0 more votes help (N=n_max), with a huge λ one completion is best."""
    hits = 0
    for seed in range(10):
        trainer = PSST(prompts=["a", "b", "c", "d"], n_max=9,
                       contexts={"free": Context((1.0,), 0.0), "dear": Context((1.0,), 10.0)},
                       budget=6000, seed=seed)
        drive(trainer, coin_sampler({"a": 0.35, "b": 0.45, "c": 0.75, "d": 0.2}, np.random.default_rng(seed)))
        policy = trainer.policy()
        hits += policy["dear"] == ("c", 1) and policy["free"][0] == "c" and policy["free"][1] >= 7
    assert hits >= 9


def test_screening_keeps_k_prompts_per_context():
    trainer = PSST(prompts=[f"p{i}" for i in range(8)], n_max=4, contexts=one_context(), budget=2000,
                   screening=TopK(k=3, fraction=0.5), seed=1)
    rng = np.random.default_rng(1)
    sampler = coin_sampler({f"p{i}": 0.1 * i for i in range(8)}, rng)
    batch = trainer.ask()
    assert {n for _, n in batch} == {1} and sum(n for _, n in batch) <= 1000
    trainer.tell([(p, n, sampler(p, n)) for p, n in batch])
    kept = np.flatnonzero(trainer.active[0].any(axis=1))
    assert len(kept) == 3
    assert {trainer.prompts[i] for i in kept} == {"p5", "p6", "p7"}


def test_tell_in_parts_and_any_order_equals_one_tell():
    def run(split: bool):
        trainer = PSST(prompts=["a", "b"], n_max=4, contexts=one_context(), budget=400, seed=3, estimator="block")
        rng = np.random.default_rng(9)
        sampler = coin_sampler({"a": 0.4, "b": 0.6}, rng)
        batch = trainer.ask()
        results = [(p, n, sampler(p, n)) for p, n in batch]
        if split:
            trainer.tell(results[1::2][::-1])
            with pytest.raises(RuntimeError):
                trainer.ask()  # the round is not fully told yet
            trainer.tell(results[0::2])
        else:
            trainer.tell(results)
        return trainer.estimates.mean().copy(), trainer.active.copy()

    (m1, a1), (m2, a2) = run(False), run(True)
    assert np.allclose(np.nan_to_num(m1), np.nan_to_num(m2)) and np.array_equal(a1, a2)


def test_string_answers_and_none():
    trainer = PSST(prompts=["a"], n_max=3, contexts=one_context(), budget=30, seed=0)
    batch = trainer.ask()
    trainer.tell([(p, n, Outcome(costs=np.zeros(n), answers=(["42"] * (n - 1) + [None]), gold="42")) for p, n in batch])
    value, se = trainer.estimate("only", "a", 1)
    assert value == pytest.approx(2 / 3) and se == pytest.approx(0.0, abs=1e-6)


def test_bon_engine_on_synthetic_task_beats_prompt_only():
    task = bon_task(synthetic_bon(seed=0))
    psst = np.mean([run_once(task, PSST, 5000, s)["regret"] for s in range(4)])
    assert psst < 0.03


def test_small_budget_never_overspends_on_math(math_env: MVEnvironment):
    task = mv_task(math_env)
    for budget in (1000, 2000, 5000):
        result = run_once(task, PSST, budget, seed=0)
        assert result["spent"] <= budget
        assert result["spent"] >= 0.9 * budget  # the schedule uses what it is given


def split_and_settled(queries: int = 200, prompts: int = 4) -> MVEnvironment:
    """Every prompt answers gold on the even queries; on the odd ones its votes split between gold
    and one wrong answer, so only there is a pooled curve at large N in doubt."""
    probs = np.zeros((prompts, queries, 3))
    probs[:, 0::2] = [1.0, 0.0, 0.0]
    probs[:, 1::2] = [0.5, 0.45, 0.05]
    probs[:, 1::2, 0] += np.linspace(0.0, 0.04, prompts)[:, None]  # a small gap between the prompts
    probs[:, 1::2, 1] -= np.linspace(0.0, 0.04, prompts)[:, None]
    return MVEnvironment("split", probs, np.zeros(queries, dtype=int), np.full(prompts, 0.01), ("only",), (0.0,), 32)


def drive_env(trainer, env, keys, rng, scores: bool = False) -> list:
    """Run to the end, each pull answered from `env` on its slot's query (named keys[slot]); with
    `scores`, best-of-N scores too. Returns the batches."""
    batches = []
    while batch := trainer.ask():
        batches.append(batch)
        trainer.tell([(p, n, Outcome(costs=np.full(n, 0.01), gold=0, query=keys[pull.query],
                                     answers=env.sample(trainer.prompt_index[p], pull.query, n, rng),
                                     scores=rng.random((n, 1)) if scores else None))
                      for pull in batch for p, n in [pull]])
    return batches


def drive_slots(trainer, env, keys, rng):
    """Run to the end; per round the number of distinct slots planned, those of them seen before, and
    the slots seen before."""
    seen, rounds = set(), []
    for batch in drive_env(trainer, env, keys, rng):
        slots = {pull.query for pull in batch}
        rounds.append((len(slots), slots & seen, set(seen)))
        seen |= slots
    return rounds


@pytest.mark.parametrize("served", [False, True])
def test_psst_revisits_the_seen_share_of_each_rounds_slots_where_the_prompts_are_in_doubt(served):
    """`served`: traffic on every query is offered first; a query the run never planned is still not
    one to revisit."""
    env = split_and_settled()
    keys = [f"q{x}" for x in range(env.n_queries)]
    trainer = PSST(prompts=["a", "b", "c", "d"], n_max=32, contexts={"only": Context((1.0,), 0.0)}, budget=1600,
                   seed=0, query_keys=keys)
    rng = np.random.default_rng(0)
    if served:
        trainer.offer([("a", 4, Outcome(costs=np.full(4, 0.01), gold=0, query=keys[x], answers=env.sample(0, x, 4, rng)))
                       for x in range(env.n_queries)])
    rounds = drive_slots(trainer, env, keys, rng)
    assert len(rounds) == 2 and rounds[0][1] == set()  # nothing is seen before the first round
    for count, revisited, seen in rounds:  # the training set never runs out of fresh queries here
        assert len(revisited) == count * len(seen) // env.n_queries
        split = {slot for slot in seen if slot % 2 == 1}
        if len(revisited) <= len(split):  # where the votes split first, then the others
            assert revisited <= split
        else:
            assert split <= revisited
    assert len(rounds[1][1]) > 0


def test_psst_with_more_pulls_per_prompt_than_queries_spreads_them_over_every_query():
    """Once every query is seen, a round may revisit all of them and still need more slots: the rest
    go to any query at random, never piled on the few left over, and the run ends within budget."""
    env = split_and_settled(queries=30)
    keys = [f"q{x}" for x in range(env.n_queries)]
    trainer = PSST(prompts=["a", "b", "c", "d"], n_max=8, contexts={"only": Context((1.0,), 0.0)}, budget=5000,
                   seed=0, query_keys=keys)
    batches = drive_env(trainer, env, keys, np.random.default_rng(0))
    assert trainer.finished and sum(n for b in batches for _, n in b) == trainer.spent <= 5000
    last = [pull.query for pull in batches[-1] if pull[0] == batches[-1][0][0]]
    assert len(last) > 2 * env.n_queries  # more pulls of one prompt than queries
    per_query = np.bincount(last, minlength=env.n_queries)
    assert per_query.min() >= 1 and per_query.max() <= 2 * len(last) / env.n_queries


@pytest.mark.parametrize("options", [{"shrink": False}, {"aggregator": "bon"}])
def test_psst_without_a_posterior_plans_the_same_slots_with_query_keys_as_without(options):
    env = split_and_settled()
    keys = list(range(env.n_queries))

    def slots(**naming):
        trainer = PSST(prompts=["a", "b", "c", "d"], n_max=16, contexts={"only": Context((1.0,), 0.0)}, budget=1600,
                       seed=0, **naming, **options)
        batches = drive_env(trainer, env, keys, np.random.default_rng(0), scores=True)
        return [[(pull[0], pull[1], pull.query) for pull in batch] for batch in batches]

    assert slots(query_keys=keys) == slots(n_queries=env.n_queries)


def test_psst_without_query_keys_never_revisits_before_every_query_is_seen():
    env = split_and_settled()
    trainer = PSST(prompts=["a", "b", "c", "d"], n_max=32, contexts={"only": Context((1.0,), 0.0)}, budget=1600,
                   seed=0, n_queries=env.n_queries)
    rounds = drive_slots(trainer, env, list(range(env.n_queries)), np.random.default_rng(0))
    assert all(not revisited for _, revisited, _ in rounds)


def test_query_keys_name_every_slot():
    with pytest.raises(ValueError, match="query_keys"):
        PSST(prompts=["a"], n_max=4, contexts=one_context(), budget=10, n_queries=3, query_keys=["x", "y"])
    trainer = PSST(prompts=["a"], n_max=4, contexts=one_context(), budget=10, query_keys=["x", "y"])
    assert trainer.n_queries == 2
