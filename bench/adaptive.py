"""Adaptive N benchmark (not a test): the best fixed arm against the best sequential arm, per tier.

    python bench/adaptive.py [--envs math,synth-mv] [--top 3] [--workers 2]

For each environment and tier (λ), every fixed arm (prompt, N ≤ n_max) is valued exactly
(policies.environments), and sequential arms (prompt, N_max ≤ n_max, waves, stopping rule) are valued
exactly by policies.stopping on the tier's `top` best prompts (by fixed value). Utility of an arm is
mean credit − λ · cost per completion · expected completions. Reported per tier: the best fixed arm; the
best sequential arm; and, at utility equal to the best fixed arm's or better (and within 10⁻⁵, 0.001
and 0.005 below it), the sequential arm with the fewest completions per request; the same for each
wave schedule, since waves are latency. Rules: `settled`, `likely` ε ∈ {10⁻⁴, 10⁻³, 10⁻²} (N_max 16,
32) and `lead` d ∈ {2, 3, 4, 6}. Values are over all
queries of each environment (an oracle comparison of arm families: no training, no sampling noise).
Writes bench/results/adaptive.json.

    python bench/adaptive.py --bon

Best-of-N on the synthetic BoN task (weights 0.5/0.5, the three λ tiers): the best fixed arm against
threshold stopping (stop at a wave's end once a completion's weighted score reaches τ), exact values
(policies.stopping.sequential_bon). Writes bench/results/adaptive_bon.json.

    python bench/adaptive.py --trained 5000,10000 [--splits 10]

The learned policy with sequential arms allowed vs not: PSST trains on the MATH train split (the
protocol of bench/psst.py) and publishes a fixed arm per tier; then, exactly as `iapo train` does for
`adaptive: {rule: learned}` (policies.stopping.best_sequential on the engine's pooled answer counts,
no peeking at the environment), the chosen prompt's sequential arms (waves of 4) are valued and the
tier takes the best by plug-in utility, fixed or sequential. Both
policies are judged exactly on the test split. Writes bench/results/adaptive_trained.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.simulate import mv_task, run_once, sem  # noqa: E402
from policies.environments import MVEnvironment, synthetic_bon, synthetic_mv  # noqa: E402
from policies.psst import PSST  # noqa: E402
from policies.stopping import (DEFAULT_TOLERANCE, StoppingRule, Waves, best_sequential,  # noqa: E402
                               sequential_bon, sequential_mv, sequential_mv_caps)

MATH = ROOT.parent / "shared" / "data" / "math_mv.npz"
RESULTS = ROOT / "bench" / "results"
WAVES = (Waves(1, 1), Waves(2, 2), Waves(4, 4), Waves(8, 8))
LEADS = (2, 3, 4, 6)
SETTLED_CAPS = (8, 16, 32)
RISKS = (1e-4, 1e-3, 1e-2)  # `likely` rules, at N_max 16 and 32
LIKELY_CAPS = (16, 32)


def environment(name: str) -> MVEnvironment:
    if name == "math":
        if not MATH.exists():
            sys.exit(f"missing {MATH}: the MATH replay data lives in ../shared/data")
        return MVEnvironment.load(str(MATH))
    if name == "synth-mv":
        return synthetic_mv(seed=0)
    raise SystemExit(f"unknown environment {name}")


def sequential_arms(args) -> list[dict]:
    """Every sequential arm of one prompt: (N_max, waves, rule) → mean credit, completions, waves."""
    env_name, prompt = args
    env = environment(env_name)
    probs, gold = env.answer_probs[prompt], env.gold
    rows = []
    for waves in WAVES:
        walks = [(rule, sequential_mv_caps(probs, gold, range(1, env.n_max + 1), waves, rule))
                 for rule in (StoppingRule("lead", lead=d) for d in LEADS)]
        walks += [(StoppingRule("settled"), {cap: sequential_mv(probs, gold, cap, waves, StoppingRule("settled"))})
                  for cap in SETTLED_CAPS if cap <= env.n_max]
        walks += [(rule, {cap: sequential_mv(probs, gold, cap, waves, rule)})
                  for rule in (StoppingRule("likely", risk=r) for r in RISKS) for cap in LIKELY_CAPS if cap <= env.n_max]
        for rule, by_cap in walks:
            for cap, value in by_cap.items():
                rows.append({"prompt": prompt, "n_max": cap, "waves": str(waves), "rule": str(rule),
                             "credit": float(value.credit.mean()), "completions": float(value.completions.mean()),
                             "waves_per_request": float(value.waves.mean())})
    return rows


def best_fixed(env: MVEnvironment, weight: float) -> dict:
    credit = env.credit().mean(axis=1)  # (P, N)
    N = np.arange(1, env.n_max + 1)
    utility = credit - weight * env.cost[:, None] * N[None, :]
    p, n = np.unravel_index(np.argmax(utility), utility.shape)
    return {"prompt": int(p), "n": int(n + 1), "credit": float(credit[p, n]), "completions": float(n + 1),
            "waves_per_request": 1.0, "utility": float(utility[p, n])}


TRAINED_WAVES = Waves(4, 4)


def trained(args) -> dict:
    """One split: the fixed policy PSST learned, and the same with sequential arms allowed (chosen as
    `iapo train` chooses them for `adaptive: {rule: learned}`), both judged exactly on the test split."""
    budget, seed = args
    env = environment("math")
    task = mv_task(env)
    run = run_once(task, PSST, budget, seed, keep=True)
    engine, policy, test = run["trainer"], run["policy"], run["test"]
    est, test_values = engine.estimates, task.values(test)
    tiers = {}
    for c, (tier, weight) in enumerate(zip(env.tier_names, env.tier_cost_weight)):
        p, n = int(policy[tier][0][1:]), int(policy[tier][1])
        choice = best_sequential(*est.answer_counts(p), float(est.cost_per_completion()[p]), weight,
                                 n, env.n_max, TRAINED_WAVES, tolerance=DEFAULT_TOLERANCE)
        row = {"fixed": {"prompt": p, "n": n, "test_utility": float(test_values[c, p, n - 1]),
                         "completions": float(n), "waves": 1.0}}
        if choice is not None:
            exact = sequential_mv(env.answer_probs[p, test], env.gold[test], choice.n_max, TRAINED_WAVES, choice.rule)
            row["with_sequential"] = {"prompt": p, "rule": str(choice.rule), "n_max": choice.n_max,
                                      "plugin_utility": choice.utility,
                                      "test_utility": float(exact.credit.mean()
                                                            - weight * env.cost[p] * exact.completions.mean()),
                                      "completions": float(exact.completions.mean()),
                                      "waves": float(exact.waves.mean())}
        else:
            row["with_sequential"] = dict(row["fixed"])
        tiers[tier] = row
    return {"budget": budget, "seed": seed, "tiers": tiers}


def trained_report(budgets: list[int], splits: int, workers: int) -> None:
    with Pool(workers) as pool:
        runs = pool.map(trained, [(b, s) for b in budgets for s in range(splits)])
    summary = {}
    for b in budgets:
        mine = [r for r in runs if r["budget"] == b]
        for tier in mine[0]["tiers"]:
            fixed = np.array([r["tiers"][tier]["fixed"]["test_utility"] for r in mine])
            seq = np.array([r["tiers"][tier]["with_sequential"]["test_utility"] for r in mine])
            comp_f = np.array([r["tiers"][tier]["fixed"]["completions"] for r in mine])
            comp_s = np.array([r["tiers"][tier]["with_sequential"]["completions"] for r in mine])
            waves = np.array([r["tiers"][tier]["with_sequential"]["waves"] for r in mine])
            gain = seq - fixed
            summary[f"{b}/{tier}"] = {
                "fixed_utility": float(fixed.mean()), "sequential_allowed_utility": float(seq.mean()),
                "paired_gain": float(gain.mean()), "paired_gain_se": sem(gain),
                "fixed_completions": float(comp_f.mean()), "sequential_allowed_completions": float(comp_s.mean()),
                "sequential_allowed_waves": float(waves.mean()),
                "splits_choosing_sequential": int(sum(r["tiers"][tier]["with_sequential"].get("rule") is not None
                                                      for r in mine))}
            v = summary[f"{b}/{tier}"]
            print(f"T={b:5d} {tier:5s} fixed u={v['fixed_utility']:.4f} comp={v['fixed_completions']:.1f} | "
                  f"sequential allowed u={v['sequential_allowed_utility']:.4f} comp={v['sequential_allowed_completions']:.1f} "
                  f"waves={v['sequential_allowed_waves']:.2f} | gain {v['paired_gain']:+.4f} ± {v['paired_gain_se']:.4f} "
                  f"({v['splits_choosing_sequential']}/{len(mine)} splits chose a sequential arm)", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "adaptive_trained.json").write_text(json.dumps({"splits": splits, "summary": summary, "runs": runs},
                                                              indent=1))
    print(f"wrote {RESULTS / 'adaptive_trained.json'}")


BON_WEIGHTS = (0.5, 0.5)
BON_TIERS = (("low", 0.0), ("mid", 0.2), ("high", 1.0))
BON_CAPS = (4, 8, 16, 32)
BON_THRESHOLDS = np.round(np.arange(0.50, 0.96, 0.05), 2)


def bon_report(top: int) -> dict:
    """Best-of-N on the synthetic BoN task (weights 0.5/0.5): the best fixed arm per tier against
    threshold stopping (stop once a completion's weighted score reaches the threshold), exact values."""
    env = synthetic_bon(seed=0)
    weights = np.array(BON_WEIGHTS)
    fixed_curve = env.expected_max(weights[None, :])[0].mean(axis=1)  # (P, N)
    values = np.einsum("pxmk,k->pxm", env.outcome_scores, weights)
    N = np.arange(1, env.n_max + 1)
    out = {}
    for tier, lam in BON_TIERS:
        utility = fixed_curve - lam * env.cost[:, None] * N[None, :]
        p, n = np.unravel_index(np.argmax(utility), utility.shape)
        fixed = {"prompt": int(p), "n": int(n + 1), "credit": float(fixed_curve[p, n]), "completions": float(n + 1),
                 "utility": float(utility[p, n])}
        arms = []
        for q in np.argsort(-utility.max(axis=1))[:top]:
            for waves in WAVES[:3]:
                for cap in BON_CAPS:
                    for threshold in BON_THRESHOLDS:
                        v = sequential_bon(values[q], env.outcome_probs[q], cap, waves, float(threshold))
                        credit, comp = float(v.credit.mean()), float(v.completions.mean())
                        arms.append({"prompt": int(q), "n_max": cap, "waves": str(waves), "threshold": float(threshold),
                                     "credit": credit, "completions": comp, "waves_per_request": float(v.waves.mean()),
                                     "utility": credit - lam * float(env.cost[q]) * comp})
        best = max(arms, key=lambda a: a["utility"])
        fits = [a for a in arms if a["utility"] >= fixed["utility"] - 1e-12]
        cheapest = min(fits, key=lambda a: a["completions"]) if fits else None
        out[tier] = {"cost_weight": lam, "best_fixed": fixed, "best_sequential": best,
                     "fewest_completions_at_fixed_utility": cheapest}
        print(f"synth-bon {tier:5s} λ={lam:<4} fixed p{fixed['prompt']} N={fixed['n']:2d} u={fixed['utility']:.4f} | "
              f"best threshold arm p{best['prompt']} τ={best['threshold']} N_max={best['n_max']} waves {best['waves']} "
              f"u={best['utility']:.4f} comp={best['completions']:.2f} w={best['waves_per_request']:.2f} | "
              + (f"at fixed utility: {cheapest['completions']:.2f} completions "
                 f"({cheapest['completions'] / fixed['completions']:.2f}×)" if cheapest else "none at fixed utility"),
              flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", default="math,synth-mv")
    parser.add_argument("--top", type=int, default=3, help="sequential arms for each tier's best prompts")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--trained", help="budgets, e.g. 5000,10000: the learned policy with sequential arms or not")
    parser.add_argument("--splits", type=int, default=10)
    parser.add_argument("--bon", action="store_true", help="only the best-of-N threshold comparison")
    args = parser.parse_args()
    if args.bon:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "adaptive_bon.json").write_text(json.dumps(bon_report(args.top), indent=1))
        return print(f"wrote {RESULTS / 'adaptive_bon.json'}")
    if args.trained:
        return trained_report([int(b) for b in args.trained.split(",")], args.splits, args.workers)
    started, report = time.time(), {"environments": {}}
    for name in args.envs.split(","):
        env = environment(name)
        credit = env.credit().mean(axis=1)
        N = np.arange(1, env.n_max + 1)
        prompts = set()
        for weight in env.tier_cost_weight:
            best_by_prompt = (credit - weight * env.cost[:, None] * N[None, :]).max(axis=1)
            prompts |= set(int(p) for p in np.argsort(-best_by_prompt)[: args.top])
        with Pool(args.workers) as pool:
            arms = [row for rows in pool.map(sequential_arms, [(name, p) for p in sorted(prompts)]) for row in rows]
        tiers = {}
        for tier, weight in zip(env.tier_names, env.tier_cost_weight):
            fixed = best_fixed(env, weight)
            for arm in arms:
                arm["utility"] = arm["credit"] - weight * float(env.cost[arm["prompt"]]) * arm["completions"]
            best = max(arms, key=lambda a: a["utility"])
            cheapest = {}
            for slack in (0.0, 1e-5, 0.001, 0.005):
                fits = [a for a in arms if a["utility"] >= fixed["utility"] - slack - 1e-12]
                cheapest[str(slack)] = dict(min(fits, key=lambda a: a["completions"])) if fits else None
            by_waves = {}
            for waves in WAVES:
                mine = [a for a in arms if a["waves"] == str(waves)]
                fits = [a for a in mine if a["utility"] >= fixed["utility"] - 1e-12]
                by_waves[str(waves)] = {"best": dict(max(mine, key=lambda a: a["utility"])),
                                        "fewest_completions_at_fixed_utility":
                                            dict(min(fits, key=lambda a: a["completions"])) if fits else None}
            tiers[tier] = {"cost_weight": weight, "best_fixed": fixed, "best_sequential": dict(best),
                           "fewest_completions_at_fixed_utility_minus": cheapest, "by_waves": by_waves}
            ratio = cheapest["0.0"]["completions"] / fixed["completions"] if cheapest["0.0"] else float("nan")
            near = cheapest["1e-05"]
            print(f"{name:9s} {tier:5s} λ={weight:<4} fixed p{fixed['prompt']} N={fixed['n']:2d} "
                  f"u={fixed['utility']:.4f} | best seq p{best['prompt']} {best['rule']} N_max={best['n_max']} "
                  f"waves {best['waves']} u={best['utility']:.4f} comp={best['completions']:.2f} "
                  f"w={best['waves_per_request']:.2f} | equal-utility completions ratio {ratio:.3f}; within 1e-5: "
                  f"{near['rule']} N_max={near['n_max']} waves {near['waves']} comp={near['completions']:.2f} "
                  f"({near['completions'] / fixed['completions']:.3f}), credit {near['credit']:.6f} "
                  f"vs {fixed['credit']:.6f}", flush=True)
        report["environments"][name] = {"prompts_searched": sorted(prompts), "tiers": tiers, "arms": len(arms)}
    report["seconds"] = round(time.time() - started, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "adaptive.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {RESULTS / 'adaptive.json'} in {report['seconds']} s")


if __name__ == "__main__":
    main()
