"""Where PSST's regret comes from: the default engine, with each prompt's estimated per-query vote
curves replaced by the exact ones from halving round k on.

Same protocol as `bench/psst.py --family` (seeded 80/20 splits, exact judging on the test split);
only what the engine reads changes. From round k on, every value it ranks or chooses by is the mean
over the queries it pulled of the exact credit curves of those (prompt, query) pairs. The planning
rule, budget and seeds are the default's; once a halving differs, which prompts are pulled, and on
how many queries, differs too. So the gap to the default is what estimating curves from a few
completions per query costs from round k on, with what those choices change downstream.
"last halving" makes the last halving and the final choice of N exact; "final N" only that choice.

    python bench/floor.py [--splits 200] [--members math,...] [--budget 5000]

Writes bench/results/psst_floor.json and prints the table for bench/README.md.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from bench.family import MEMBERS, load_member  # noqa: E402
from bench.simulate import run_once, sem  # noqa: E402
from policies.psst import PSST  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "psst_floor.json"
DEFAULT_MEMBERS = ["math", "math-P12-X150", "math-P20-X250", "math-P25-X160", "math-P10-X316", "heldout-like"]
LAST, FINAL = -1, -2  # pseudo-rounds: exact from the last halving on (with the final N); exact for the final N only
VARIANTS = {"default": None, "exact from round 0": 0, "exact from round 1": 1, "exact from round 2": 2,
            "exact in the last halving and N": LAST, "exact for the final N": FINAL}


class ExactCurves:
    """Reads like the engine's estimates; from the engine's round `start` on, its means are those of
    the exact per-query credit (`per_query` (C, P, X, n_max)) over the queries each prompt was pulled on.
    Everything else (stderr, rows, counts) is the wrapped estimates' own."""

    def __init__(self, estimates, per_query: np.ndarray, engine: PSST, start: int) -> None:
        self.inner, self.per_query, self.engine, self.start = estimates, np.asarray(per_query), engine, start

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _exact(self) -> bool:
        e = self.engine
        if self.start == FINAL:
            return e.choosing or e.finished
        start = e.rounds - 1 if self.start == LAST else self.start
        return e.phase == "rounds" and e.round >= start  # at the final choice, round == rounds

    def mean(self) -> np.ndarray:
        estimated = self.inner.mean()
        if not self._exact():
            return estimated
        inner = self.inner
        # query keys in index order (indices are given in insertion order); the simulator's key is the query's index
        query_of = np.fromiter(inner.queries, dtype=int, count=len(inner.queries))
        curves = self.per_query[:, inner.row_prompt, query_of[inner.row_query], :]  # (C, R, n_max)
        sums = np.zeros((curves.shape[0], inner.n_prompts, curves.shape[2]))
        np.add.at(sums, (slice(None), inner.row_prompt), curves)
        return inner.mean_of(sums)


class ExactFrom(PSST):
    """The default PSST reading exact curves from round `start` on (see ExactCurves)."""

    def __init__(self, *args, per_query: np.ndarray, start: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.choosing = False  # in _finish: the surviving prompt's N is chosen
        self.estimates = ExactCurves(self.estimates, per_query, self, start)

    def _finish(self) -> None:
        self.choosing = True
        super()._finish()


def _job(args):
    member, variant, budget, seed = args
    task, start = load_member(member), VARIANTS[variant]
    make = PSST if start is None else functools.partial(ExactFrom, per_query=task.per_query, start=start)
    return member, variant, seed, run_once(task, make, budget, seed)["regret"]


def run(members: list[str], budget: int, splits: int, workers: int) -> dict:
    jobs = [(m, v, budget, s) for m in members for v in VARIANTS for s in range(splits)]
    start = time.time()
    with Pool(workers) as pool:
        out = pool.map(_job, jobs, chunksize=max(1, len(jobs) // (workers * 40)))
    regret = {(m, v): np.full(splits, np.nan) for m in members for v in VARIANTS}
    for m, v, s, r in out:
        regret[(m, v)][s] = r
    cells = {m: {v: {"regret": float(regret[(m, v)].mean()), "regret_se": sem(regret[(m, v)]),
                     "vs_default": float((regret[(m, v)] - regret[(m, "default")]).mean()),
                     "vs_default_se": sem(regret[(m, v)] - regret[(m, "default")])} for v in VARIANTS}
             for m in members}
    return {"budget": budget, "splits": splits, "wall_s": round(time.time() - start, 1), "cells": cells}


def markdown(report: dict) -> str:
    head = ["member"] + list(VARIANTS)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, by in report["cells"].items():
        row = [m]
        for v, c in by.items():
            cell = f"{c['regret']:.4f} ± {c['regret_se']:.4f}"
            if v != "default":
                cell += f" ({c['vs_default']:+.4f} ± {c['vs_default_se']:.4f})"
            cell = cell.replace("-", "−")
            row.append(cell)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--splits", type=int, default=200)
    ap.add_argument("--budget", type=int, default=5000)
    ap.add_argument("--members", default=",".join(DEFAULT_MEMBERS))
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args()
    members = a.members.split(",")
    unknown = [m for m in members if m not in MEMBERS]
    if unknown:
        sys.exit(f"unknown members: {', '.join(unknown)} (known: {', '.join(MEMBERS)})")
    report = run(members, a.budget, a.splits, a.workers)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1))
    print(markdown(report))
    print(f"\n{a.splits} splits per cell at T = {a.budget}; {report['wall_s']} s", file=sys.stderr)


if __name__ == "__main__":
    main()
