"""PSST benchmark (not a test): regret and ACR against budget on MATH replay and synthetic tasks.

    python bench/psst.py [--runs 100] [--budgets 1000,2000,5000,10000,20000] [--envs math,synth-mv,synth-bon]
    python bench/psst.py --family [--runs 40] [--budgets 2000,5000,10000]   # the environment family

Protocol (the paper's): run s splits the queries with default_rng(s).permutation(X) (80% train),
trains on the train split only through ask/tell against a simulator, and judges the policy on the
test split with exact arm values. Regret = ACR(train-oracle) − ACR(policy), both on test.
Writes bench/results/psst.json, bench/results/psst.png and the table in bench/README.md; with
--family, bench/results/psst_family.json and the family table (members: bench/family.py).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections import defaultdict
from multiprocessing import Pool
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from bench.family import MEMBERS, SlotsHidden, family_markdown, run_family  # noqa: E402
from bench.simulate import Task, bon_task, mv_task, run_once, sem  # noqa: E402
from policies.baselines import UCB, PromptThenN, SequentialHalving, Uniform  # noqa: E402
from policies.environments import MVEnvironment, synthetic_bon, synthetic_mv  # noqa: E402
from policies.psst import PSST, TopK  # noqa: E402

MATH = ROOT.parent / "shared" / "data" / "math_mv.npz"
RESULTS = ROOT / "bench" / "results"


ALGORITHMS = {
    "PSST": PSST,  # ours, default: pooled estimates with soft-shrunk MV curves, pulls of 4, revisits
    "PSST without revisits": SlotsHidden(PSST, keep="count"),  # the default before the revisits (plan version 2)
    "PSST (plug-in curves, pulls of 8)": functools.partial(PSST, shrink=False),  # the default before issue 11
    "PSST (subset; largest N)": functools.partial(PSST, estimator="subset"),
    "PSST-paper (blocks; unpaired)": SlotsHidden(PSST, keep="none", estimator="block"),
    "PSST+Top-1": functools.partial(PSST, screening=TopK(1)),
    "PSST+Top-4": functools.partial(PSST, screening=TopK(4)),
    "PSST+Top-8": functools.partial(PSST, screening=TopK(8)),
    "Uniform": Uniform,
    "SH (no reuse)": SequentialHalving,
    "UCB": UCB,
    "Prompt at N=1 then N": PromptThenN,
}

# ablations of the default (pulls of 4, halving prompts, revisits), at T = 5K and 10K only
SWEEP = {f"PSST, pulls of {m}": functools.partial(PSST, pull_size=m) for m in (6, 8, 12, 16)}
SWEEP["PSST, halving arms (⌈log2 |A|⌉ rounds)"] = functools.partial(PSST, halve_prompts=False)
SWEEP_BUDGETS = (5000, 10000)

_TASKS: dict[str, Task] = {}


def load_task(name: str) -> Task:
    if name not in _TASKS:
        if name == "math":
            _TASKS[name] = mv_task(MVEnvironment.load(str(MATH)))
        elif name == "synth-mv":
            _TASKS[name] = mv_task(synthetic_mv(seed=0))
        elif name == "synth-bon":
            _TASKS[name] = bon_task(synthetic_bon(seed=0))
        else:
            raise ValueError(name)
    return _TASKS[name]


def _job(args):
    env, algo, budget, seed = args
    return env, algo, budget, run_once(load_task(env), {**ALGORITHMS, **SWEEP}[algo], budget, seed)


def bookkeeping_time(repeats: int = 5) -> float:
    """Median seconds of one PSST run's own work (ask/tell/policy, not pulls) at T = 20K on MATH."""
    return float(np.median([run_once(load_task("math"), PSST, 20_000, s)["bookkeeping_s"] for s in range(repeats)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--budgets", default=None, help="default 1000,2000,5000,10000,20000; --family: 2000,5000,10000")
    parser.add_argument("--envs", default="math,synth-mv,synth-bon")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-sweep", action="store_true", help="skip the pull-size sweep")
    parser.add_argument("--out", default=None)
    parser.add_argument("--family", action="store_true", help="the environment family instead (bench/family.py)")
    parser.add_argument("--members", default=",".join(MEMBERS), help="family members (with --family)")
    args = parser.parse_args()
    if args.family:
        return family(args)
    args.out = args.out or str(RESULTS / "psst.json")
    args.budgets = args.budgets or "1000,2000,5000,10000,20000"
    budgets = [int(b) for b in args.budgets.split(",")]
    envs = args.envs.split(",")
    algos = [a for a in ALGORITHMS if a in args.algorithms.split(",")]
    if "math" in envs and not MATH.exists():
        sys.exit(f"MATH replay data not found at {MATH}")
    jobs = [(e, a, b, s) for e in envs for a in algos for b in budgets for s in range(args.runs)]
    if not args.no_sweep:
        jobs += [(e, a, b, s) for e in envs for a in SWEEP for b in SWEEP_BUDGETS for s in range(args.runs)]
    start = time.time()
    with Pool(args.workers, initializer=lambda: [load_task(e) for e in envs]) as pool:
        outcomes = pool.map(_job, jobs, chunksize=max(1, len(jobs) // (args.workers * 40)))
    by = defaultdict(list)
    for env, algo, budget, result in outcomes:
        by[(env, algo, budget)].append(result)
    rows = []
    for (env, algo, budget), results in by.items():
        regret = np.array([r["regret"] for r in results])
        rows.append({
            "env": env, "algorithm": algo, "budget": budget, "runs": len(results),
            "regret": float(regret.mean()), "regret_se": sem(regret),
            "acr": float(np.mean([r["acr"] for r in results])), "oracle_acr": float(np.mean([r["oracle"] for r in results])),
            "max_spent": int(max(r["spent"] for r in results)),
        })
    report = {"runs": args.runs, "budgets": budgets, "wall_s": round(time.time() - start, 1),
              "psst_bookkeeping_s_T20K_math": bookkeeping_time() if "math" in envs else None, "rows": rows,
              "paired": paired(outcomes, envs, budgets)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    plot(rows, envs, algos, Path(args.out).with_suffix(".png"))
    table = markdown(rows, envs, algos, budgets) + paired_markdown(report["paired"], envs, budgets)
    if not args.no_sweep:
        table += ("\n\n**Ablations** of the default (soft-shrunk curves with the query tilt, pulls of 4, halving "
                  "prompts, revisits):\n") + markdown(rows, envs, ["PSST"] + list(SWEEP), list(SWEEP_BUDGETS), oracle_row=False)
    print(table)
    print(f"bookkeeping of one PSST run at T=20K on MATH: {report['psst_bookkeeping_s_T20K_math']}")
    if Path(args.out) == RESULTS / "psst.json":
        update_readme(table, report)


def family(args) -> None:
    """Regret of PSST and the paper's form on every family member; json, and the table in the README."""
    budgets = [int(b) for b in (args.budgets or "2000,5000,10000").split(",")]
    if not MATH.exists():
        sys.exit(f"MATH replay data not found at {MATH}")
    report = run_family(args.members.split(","), budgets, args.runs, args.workers)
    out = Path(args.out or RESULTS / "psst_family.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    table = family_markdown(report)
    print(table)
    if out == RESULTS / "psst_family.json":
        update_readme(table, report, marker="psst-family",
                      note=f"_{report['splits']} splits per cell; generated by `python bench/psst.py --family "
                           f"--runs {report['splits']}` in {report['wall_s']} s_\n")


BASELINES = ("Uniform", "SH (no reuse)", "UCB", "Prompt at N=1 then N", "PSST-paper (blocks; unpaired)",
             "PSST (subset; largest N)")


def paired(outcomes, envs, budgets) -> list[dict]:
    """PSST variants against each baseline on the same seeds (same splits): mean regret gap and its
    paired standard error; gap > 2 s.e. means the variant wins beyond noise."""
    seeds = defaultdict(dict)  # pool.map keeps job order, so the k-th result of a cell is seed k
    for e, a, b, r in outcomes:
        seeds[(e, a, b)][len(seeds[(e, a, b)])] = r["regret"]
    out = []
    for env in envs:
        for budget in budgets:
            for ours in ("PSST", "PSST+Top-4", "PSST+Top-8"):
                if (env, ours, budget) not in seeds:
                    continue
                for base in BASELINES:
                    if (env, base, budget) not in seeds:
                        continue
                    a, b = seeds[(env, ours, budget)], seeds[(env, base, budget)]
                    common = sorted(set(a) & set(b))
                    gap = np.array([b[s] - a[s] for s in common])
                    se = sem(gap)
                    out.append({"env": env, "budget": budget, "ours": ours, "baseline": base,
                                "gap": float(gap.mean()), "se": se, "z": float(gap.mean() / se) if se > 0 else float("inf")})
    return out


def paired_markdown(pairs, envs, budgets) -> str:
    lines = ["\n**Paired comparisons** (same seeds and splits): baseline regret − ours, mean ± s.e. (z)\n"]
    for env in envs:
        for ours in ("PSST", "PSST+Top-4", "PSST+Top-8"):
            cells = [p for p in pairs if p["env"] == env and p["ours"] == ours and p["budget"] >= 5000]
            if not cells:
                continue
            lines.append(f"\n{env}, {ours} (T ≥ 5K):\n")
            lines.append("| baseline | " + " | ".join(f"T={b // 1000}K" for b in budgets if b >= 5000) + " |")
            lines.append("|---|" + "---|" * len([b for b in budgets if b >= 5000]))
            for base in BASELINES:
                row = [next((p for p in cells if p["baseline"] == base and p["budget"] == b), None)
                       for b in budgets if b >= 5000]
                if any(row):
                    lines.append(f"| {base} | " + " | ".join(
                        f"{p['gap']:+.4f} ± {p['se']:.4f} ({p['z']:+.1f})" if p else "" for p in row) + " |")
    return "\n".join(lines)


def plot(rows, envs, algos, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(envs), figsize=(5.5 * len(envs), 4.2), squeeze=False)
    for ax, env in zip(axes[0], envs):
        for algo in algos:
            pts = sorted((r["budget"], r["acr"] / r["oracle_acr"]) for r in rows if r["env"] == env and r["algorithm"] == algo)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=algo, linewidth=2.2 if algo == "PSST" else 1.2)
        ax.set_xscale("log")
        ax.set_title(env)
        ax.set_xlabel("training budget T (completions)")
        ax.set_ylabel("ACR / train-oracle ACR (test split)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(rows, envs, algos, budgets, oracle_row: bool = True) -> str:
    lines = []
    for env in envs:
        lines.append(f"\n**{env}**: regret (mean ± s.e.) by budget T\n")
        lines.append("| algorithm | " + " | ".join(f"T={b // 1000}K" for b in budgets) + " |")
        lines.append("|---|" + "---|" * len(budgets))
        for algo in algos:
            cells = []
            for b in budgets:
                r = next((r for r in rows if (r["env"], r["algorithm"], r["budget"]) == (env, algo, b)), None)
                cells.append(f"{r['regret']:.4f} ± {r['regret_se']:.4f}" if r else "")
            lines.append(f"| {algo} | " + " | ".join(cells) + " |")
        if not oracle_row:
            continue
        oracle = {b: next(r["oracle_acr"] for r in rows if r["env"] == env and r["budget"] == b) for b in budgets}
        lines.append("| *train-oracle ACR* | " + " | ".join(f"{oracle[b]:.4f}" for b in budgets) + " |")
    return "\n".join(lines)


def update_readme(table: str, report: dict, marker: str = "psst-table", note: str | None = None) -> None:
    readme = ROOT / "bench" / "README.md"
    text = readme.read_text() if readme.exists() else ""
    begin, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    note = note or (f"_{report['runs']} runs per cell; generated by `python bench/psst.py` "
                    f"in {report['wall_s']} s; one PSST run's bookkeeping at T=20K on MATH: "
                    f"{report['psst_bookkeeping_s_T20K_math']:.3f} s (median of 5)_")
    block = f"{begin}\n{note}\n{table}\n{end}"
    if begin in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text += "\n" + block + "\n"
    readme.write_text(text)


if __name__ == "__main__":
    main()
