"""The environment family of the PSST benchmark: its members, cached exact values, and the table.

Members are MV tasks (majority vote, the three λ tiers 0 / 0.2 / 1.0, N_max = 32): the MATH replay,
resamples of it (subsets of prompts and of queries), the deceptive synthetic task, a stand-in for
the shape of the held-back set, and synthetic tasks from `policies.families` spanning 10–100
prompts, 2–10 answer classes, tiny to large gaps, deceptive prompts and mixed query difficulty.
Exact per-query vote credit is expensive for the large members (tens of seconds), so it is cached
on disk (`IAPO_BENCH_CACHE`, default the system temp dir), keyed by member name and a data digest.
"""
from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from bench.simulate import Task, run_once, sem
from policies.arms import Context
from policies.environments import MVEnvironment, synthetic_mv
from policies.families import FamilySpec, heldout_like, resample_mv, synthetic_family_mv
from policies.psst import PSST

ROOT = Path(__file__).resolve().parents[1]
MATH = ROOT.parent / "shared" / "data" / "math_mv.npz"
CACHE = Path(os.environ.get("IAPO_BENCH_CACHE", Path(tempfile.gettempdir()) / "iapo-psst-cache"))


def _math() -> MVEnvironment:
    return MVEnvironment.load(str(MATH))


SPECS = {  # synthetic members: (spec, seed)
    "p10-c2-large-gap": (FamilySpec(n_prompts=10, n_classes=2, gap=0.5, accuracy=(0.55, 0.75)), 2),
    "p24-c4-tiny-gap": (FamilySpec(n_prompts=24, n_classes=4, gap=0.02), 7),
    "p16-c6-deceptive": (FamilySpec(n_prompts=16, n_classes=6, deceptive=4, mix=(0.3, 0.6, 0.1), distractor=2.0,
                                    interaction=0.8), 5),
    "p32-c3-hard": (FamilySpec(n_prompts=32, n_classes=3, mix=(0.4, 0.3, 0.3), gap=0.1), 6),
    "p48-c10-deceptive": (FamilySpec(n_prompts=48, n_queries=300, n_classes=10, deceptive=6, gap=0.08,
                                     distractor=1.0, accuracy=(0.45, 0.7)), 8),
    "p64-c5-tiny-gap": (FamilySpec(n_prompts=64, n_queries=600, n_classes=5, gap=0.03, mix=(0.45, 0.4, 0.15)), 9),
    "p100-c4-easy": (FamilySpec(n_prompts=100, n_queries=500, n_classes=4, gap=0.1, mix=(0.7, 0.2, 0.1),
                                accuracy=(0.6, 0.85)), 10),
}

MEMBERS = {  # name -> (kind, builder); kind "real" = MATH or a resample of it
    "math": ("real", _math),
    "math-P12-X150": ("real", lambda: resample_mv(_math(), 1, 12, 150, name="math-P12-X150")),
    "math-P20-X250": ("real", lambda: resample_mv(_math(), 2, 20, 250, name="math-P20-X250")),
    "math-P25-X160": ("real", lambda: resample_mv(_math(), 3, 25, 160, name="math-P25-X160")),
    "math-P10-X316": ("real", lambda: resample_mv(_math(), 4, 10, 316, name="math-P10-X316")),
    "synth-mv": ("synthetic", lambda: synthetic_mv(seed=0)),
    "heldout-like": ("synthetic", lambda: heldout_like(0)),
    **{name: ("synthetic", (lambda s=spec, seed=seed, name=name: synthetic_family_mv(s, seed, name)))
       for name, (spec, seed) in SPECS.items()},
}


@functools.lru_cache(maxsize=None)
def load_member(name: str) -> Task:
    """The member's task with its exact per-query credit, from the disk cache when present (and
    kept per process: a worker builds each member once)."""
    env = MEMBERS[name][1]()
    digest = hashlib.sha1(env.answer_probs.tobytes() + env.gold.tobytes()).hexdigest()[:16]
    path = CACHE / f"{name}-{digest}.npy"
    if path.exists():
        credit = np.load(path)
    else:
        credit = env.credit()
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, credit)
        os.replace(tmp, path)
    contexts = {n: Context((1.0,), lam) for n, lam in zip(env.tier_names, env.tier_cost_weight)}
    return Task(env.name, env, contexts, np.broadcast_to(credit, (len(contexts),) + credit.shape))


def summary(cells: dict[str, dict[int, dict]], budgets: list[int]) -> dict[int, dict]:
    """Median and worst member per budget: cells[member][budget] = {'regret': ..., 'regret_se': ...}."""
    out = {}
    for b in budgets:
        rows = [(m, c[b]) for m, c in cells.items() if b in c]
        regrets = np.array([r["regret"] for _, r in rows])
        worst = max(rows, key=lambda mr: mr[1]["regret"])
        out[b] = {"median": float(np.median(regrets)), "worst": float(worst[1]["regret"]),
                  "worst_se": float(worst[1]["regret_se"]), "worst_member": worst[0]}
    return out


class SlotsHidden:
    """Factory that tells the engine less about the training set's query slots: `keep="count"` gives
    only their number (`n_queries`: paired slots, but no query keys, so no revisits on purpose);
    `keep="none"` nothing (pulls use independently sampled queries)."""

    def __init__(self, cls, keep: str, **options) -> None:
        if keep not in ("count", "none"):
            raise ValueError(f"keep must be 'count' or 'none', got {keep!r}")
        self.cls, self.keep, self.options = cls, keep, options

    def __call__(self, query_keys=None, n_queries=None, **kwargs):
        if self.keep == "count" and query_keys is not None:
            n_queries = len(query_keys)
        return self.cls(**kwargs, **self.options, **({"n_queries": n_queries} if self.keep == "count" else {}))


ALGORITHMS = {
    # the default: pooled curves shrunk by a soft prior tilted per query, pulls of 4 (more once queries
    # run out), revisits of the seen queries the active prompts are least certain on
    "PSST": PSST,
    "PSST-paper (blocks; unpaired)": SlotsHidden(PSST, keep="none", estimator="block"),
}
BEFORE = "PSST without revisits (before)"
ABLATIONS = {BEFORE: SlotsHidden(PSST, keep="count")}  # at ABLATION_BUDGET
ABLATION_BUDGET = 5000
PAPER = "PSST-paper (blocks; unpaired)"

def _job(args):
    member, algo, budget, seed = args
    return member, algo, budget, seed, run_once(load_member(member), {**ALGORITHMS, **ABLATIONS}[algo], budget,
                                                seed)["regret"]


def run_family(members: list[str], budgets: list[int], splits: int, workers: int) -> dict:
    """Regret per (member, algorithm, budget) over `splits` seeded splits, paired gaps to the paper's
    PSST, and the summary rows (median and worst member) of the default PSST."""
    jobs = [(m, a, b, s) for m in members for a in ALGORITHMS for b in budgets for s in range(splits)]
    jobs += [(m, a, ABLATION_BUDGET, s) for m in members for a in ABLATIONS for s in range(splits)]
    start = time.time()
    with Pool(workers) as pool:
        out = pool.map(_job, jobs, chunksize=max(1, len(jobs) // (workers * 40)))
    regret: dict[tuple[str, str, int], np.ndarray] = {}
    for m, a, b, s, r in out:
        regret.setdefault((m, a, b), np.full(splits, np.nan))[s] = r
    cells = {m: {a: {b: {"regret": float(v.mean()), "regret_se": sem(v), "per_split": [round(float(x), 6) for x in v]}
                     for (mm, aa, b), v in regret.items() if (mm, aa) == (m, a)}
                 for a in {**ALGORITHMS, **ABLATIONS}} for m in members}
    for m in members:
        for a in {**ALGORITHMS, **ABLATIONS}:
            for b, cell in cells[m][a].items():
                gap = lambda other: regret[(m, a, b)] - regret[(m, other, b)]  # paired; > 0: worse than other
                if a != PAPER and (m, PAPER, b) in regret:  # the ablation's budget may not be one of `budgets`
                    cell.update(vs_paper=float(gap(PAPER).mean()), vs_paper_se=sem(gap(PAPER)))
                if a == "PSST" and b == ABLATION_BUDGET:
                    cell.update(vs_before=float(gap(BEFORE).mean()), vs_before_se=sem(gap(BEFORE)))
    return {"splits": splits, "budgets": budgets, "wall_s": round(time.time() - start, 1),
            "kinds": {m: MEMBERS[m][0] for m in members}, "cells": cells,
            "summary": summary({m: cells[m]["PSST"] for m in members}, budgets)}


def family_markdown(report: dict) -> str:
    """The family table: PSST's regret per member and budget, the paper's form, and at 5K the paired
    gap to it, the engine without revisits and the paired gap to that."""
    budgets, cells = report["budgets"], report["cells"]
    head = ["member", "kind"] + [f"PSST T={b // 1000}K" for b in budgets] + [f"paper T={b // 1000}K" for b in budgets]
    head += ["PSST − paper, 5K", "without revisits (before), 5K", "PSST − before, 5K"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda c: f"{c['regret']:.4f} ± {c['regret_se']:.4f}" if c else ""
    for m, by in cells.items():
        gap = by["PSST"].get(5000, {})
        row = [m, report["kinds"][m]] + [fmt(by["PSST"].get(b)) for b in budgets]
        row += [fmt(by[PAPER].get(b)) for b in budgets]
        row += [f"{gap['vs_paper']:+.4f} ± {gap['vs_paper_se']:.4f}" if "vs_paper" in gap else "",
                fmt(by[BEFORE].get(ABLATION_BUDGET)),
                f"{gap['vs_before']:+.4f} ± {gap['vs_before_se']:.4f}" if "vs_before" in gap else ""]
        lines.append("| " + " | ".join(row) + " |")
    s = report["summary"]
    pad = lambda row: row + [""] * (len(head) - len(row))
    lines.append("| " + " | ".join(pad(["**median member**", ""] + [f"{s[b]['median']:.4f}" for b in budgets])) + " |")
    lines.append("| " + " | ".join(pad(["**worst member**", ""] + [
        f"{s[b]['worst']:.4f} ± {s[b]['worst_se']:.4f} ({s[b]['worst_member']})" for b in budgets])) + " |")
    return "\n".join(lines)
