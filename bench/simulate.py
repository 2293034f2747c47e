"""Simulated pulls and exact judging for the PSST benchmark (shared by bench/psst.py and tests)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from policies.arms import Context
from policies.environments import BoNEnvironment, MVEnvironment, bon_contexts
from policies.psst import Outcome


@dataclass
class Task:
    """An environment with its contexts and exact per-query arm values (C, P, X, n_max)."""

    name: str
    env: MVEnvironment | BoNEnvironment
    contexts: dict[str, Context]
    per_query: np.ndarray  # quality part of the value, per query: (C, P, X, n_max)

    @property
    def aggregator(self) -> str:
        return "mv" if isinstance(self.env, MVEnvironment) else "bon"

    def values(self, queries: np.ndarray) -> np.ndarray:
        """Exact arm values on a query subset: (C, P, n_max)."""
        lam = np.array([c.cost_weight for c in self.contexts.values()])
        n = np.arange(1, self.env.n_max + 1)
        return self.per_query[:, :, queries].mean(axis=2) - lam[:, None, None] * n * self.env.cost[None, :, None]


def mv_task(env: MVEnvironment) -> Task:
    contexts = {name: Context((1.0,), lam) for name, lam in zip(env.tier_names, env.tier_cost_weight)}
    credit = env.credit()
    return Task(env.name, env, contexts, np.broadcast_to(credit, (len(contexts),) + credit.shape))


def bon_task(env: BoNEnvironment) -> Task:
    weights, lambdas, names = bon_contexts()
    contexts = {name: Context(tuple(w), lam) for name, w, lam in zip(names, weights, lambdas)}
    return Task(env.name, env, contexts, env.expected_max(weights))


class Simulator:
    """Answers a round of pulls by sampling the environment on training queries."""

    def __init__(self, task: Task, train: np.ndarray, rng: np.random.Generator) -> None:
        self.task, self.train, self.rng = task, train, rng

    def run(self, pulls) -> list[tuple[str, int, Outcome]]:
        env = self.task.env
        by_arm: dict[tuple[str, int], list] = {}
        for pull in pulls:
            by_arm.setdefault(tuple(pull), []).append(pull)
        results = []
        for (prompt_id, n), group in by_arm.items():
            p = int(prompt_id[1:])
            slots = [pull.query for pull in group]
            if slots[0] is None:
                queries = self.train[self.rng.integers(len(self.train), size=len(group))]
            else:
                queries = self.train[np.asarray(slots) % len(self.train)]
            draws = env.sample_many(np.full(len(group), p), queries, n, self.rng)
            costs = np.full(n, env.cost[p])
            if isinstance(env, MVEnvironment):
                results += [(prompt_id, n, Outcome(costs=costs, answers=d, gold=int(env.gold[x]), query=int(x)))
                            for d, x in zip(draws, queries)]
            else:
                scores = env.outcome_scores[p, queries[:, None], draws]  # (Q, n, K)
                results += [(prompt_id, n, Outcome(costs=costs, scores=s, query=int(x))) for s, x in zip(scores, queries)]
        return results


def sem(values) -> float:
    """Standard error of the mean of per-split values (NaN below two)."""
    x = np.asarray(values, dtype=float)
    return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def run_once(task: Task, make, budget: int, seed: int, train_fraction: float = 0.8, keep: bool = False) -> dict:
    """One run of the paper's protocol: split, train on train only, judge exactly on test (`keep`: the
    result also holds the trained engine, its policy and the test queries)."""
    X = task.env.n_queries
    perm = np.random.default_rng(seed).permutation(X)
    cut = int(np.floor(train_fraction * X))
    train, test = perm[:cut], perm[cut:]
    sim = Simulator(task, train, np.random.default_rng(10_000 + seed))
    prompts = [f"p{i}" for i in range(task.env.n_prompts)]
    trainer = make(prompts=prompts, n_max=task.env.n_max, contexts=task.contexts, budget=budget,
                   aggregator=task.aggregator, seed=seed, query_keys=[int(x) for x in train])
    bookkeeping = 0.0
    while True:
        t0 = time.perf_counter()
        batch = trainer.ask()
        bookkeeping += time.perf_counter() - t0
        if not batch:
            break
        results = sim.run(batch)
        t0 = time.perf_counter()
        trainer.tell(results)
        bookkeeping += time.perf_counter() - t0
    t0 = time.perf_counter()
    policy = trainer.policy()
    bookkeeping += time.perf_counter() - t0
    test_values = task.values(test)
    train_values = task.values(train)
    C = len(task.contexts)
    chosen = np.array([test_values[c, int(policy[name][0][1:]), policy[name][1] - 1]
                       for c, name in enumerate(task.contexts)])
    oracle_flat = train_values.reshape(C, -1).argmax(axis=1)
    oracle = test_values.reshape(C, -1)[np.arange(C), oracle_flat]
    result = {"acr": float(chosen.mean()), "oracle": float(oracle.mean()), "regret": float(oracle.mean() - chosen.mean()),
              "spent": int(trainer.spent), "bookkeeping_s": bookkeeping}
    if keep:
        result.update(trainer=trainer, policy=policy, test=test)
    return result
