"""bench/floor.py: the engine reads estimated curves before round k and exact ones from round k on."""
from __future__ import annotations

import numpy as np
import pytest

from bench.floor import FINAL, LAST, ExactFrom
from bench.simulate import Simulator, mv_task
from policies.environments import synthetic_mv
from policies.psst import PSST


def _exact_means(task, engine) -> np.ndarray:
    """Mean over each prompt's pulled queries of the exact per-query credit, minus the cost curve."""
    inner = engine.estimates.inner
    out = np.full(task.per_query.shape[:2] + task.per_query.shape[3:], np.nan)
    for p in range(task.env.n_prompts):
        queries = [int(key) for (prompt, key) in inner.rows if prompt == p]
        if queries:
            out[:, p] = task.per_query[:, p, queries, :].mean(axis=1)
    return out - inner._cost_curve()


def _train(task) -> np.ndarray:
    """A shuffled training set, as run_once draws it: slot, position and query index all differ."""
    return np.random.default_rng(5).permutation(task.env.n_queries)[: task.env.n_queries * 4 // 5]


@pytest.fixture
def task():
    return mv_task(synthetic_mv(seed=2, n_prompts=8, n_queries=60))


@pytest.fixture
def drive(task):
    """drive(engine, rounds): answer that many rounds of the engine's pulls (None: until it stops)."""
    sim = Simulator(task, _train(task), np.random.default_rng(1))

    def run(engine, rounds: int | None = None) -> None:
        while (rounds is None or rounds > 0) and (batch := engine.ask()):
            engine.tell(sim.run(batch))
            rounds = None if rounds is None else rounds - 1
    return run


def _engine(task, start: int, budget: int = 3000):
    prompts = [f"p{i}" for i in range(task.env.n_prompts)]
    return ExactFrom(prompts=prompts, n_max=task.env.n_max, contexts=task.contexts, budget=budget, seed=3,
                     n_queries=len(_train(task)), per_query=task.per_query, start=start)


def test_means_are_estimated_before_round_k_and_exact_from_it(task, drive):
    engine = _engine(task, start=1)
    drive(engine, 1)  # round 0 told: the engine is now in round 1
    assert engine.round == 1
    assert np.allclose(engine.estimates.mean(), _exact_means(task, engine), equal_nan=True)
    assert not np.allclose(engine.estimates.inner.mean(), _exact_means(task, engine), equal_nan=True)

    before = _engine(task, start=2)
    drive(before, 1)
    assert np.array_equal(before.estimates.mean(), before.estimates.inner.mean(), equal_nan=True)
    drive(before, 1)  # now in round 2
    assert before.round == 2
    assert np.allclose(before.estimates.mean(), _exact_means(task, before), equal_nan=True)


def test_last_halving_is_exact_and_the_rounds_before_it_are_not(task, drive):
    engine = _engine(task, start=LAST)
    assert engine.rounds == 3
    drive(engine, 1)  # round 1 of 0..2
    assert np.array_equal(engine.estimates.mean(), engine.estimates.inner.mean(), equal_nan=True)
    drive(engine, 1)  # round 2, the last halving
    assert np.allclose(engine.estimates.mean(), _exact_means(task, engine), equal_nan=True)


def test_a_budget_gone_early_still_halves_to_one_arm_on_the_variant_s_curves(task, drive):
    engine = _engine(task, start=1, budget=40)  # too small for every round: the last halving runs on what it bought
    drive(engine)
    assert engine.finished and engine.spent <= 40
    assert (engine.active.reshape(len(engine.context_names), -1).sum(axis=1) == 1).all()
    means = _exact_means(task, engine)
    for c, (prompt, n) in engine.policy().items():
        ci, pi = engine.context_names.index(c), engine.prompt_index[prompt]
        assert n - 1 == int(np.nanargmax(means[ci, pi]))


def test_final_n_is_chosen_on_exact_curves_after_estimated_halving(task):
    exact, plain = _engine(task, start=FINAL), _engine(task, start=99)
    prompts = [f"p{i}" for i in range(task.env.n_prompts)]
    default = PSST(prompts=prompts, n_max=task.env.n_max, contexts=task.contexts, budget=3000, seed=3,
                   n_queries=len(_train(task)))
    for engine in (exact, plain, default):  # each against its own simulator, seeded alike: the same draws
        sim = Simulator(task, _train(task), np.random.default_rng(1))
        while batch := engine.ask():
            engine.tell(sim.run(batch))
    # the same pulls and halving: the survivor prompt per context is the default's
    assert {c: p for c, (p, _) in exact.policy().items()} == {c: p for c, (p, _) in default.policy().items()}
    assert plain.policy() == default.policy()
    means = _exact_means(task, exact)
    for c, (prompt, n) in exact.policy().items():
        ci, pi = exact.context_names.index(c), exact.prompt_index[prompt]
        assert n - 1 == int(np.argmax(means[ci, pi]))  # the best N on exact curves
