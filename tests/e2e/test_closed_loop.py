"""Closed loop over loopback: serve with a poor arm, feedback, `iapo train` through litellm against the
replay upstream, publish, and the running gateway serves the better arm (utility measured per tier)."""
from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest
import sqlite_utils

from gateway.cli import main as iapo
from gateway.config import hash_key
from sandbox.demo import replay_route, replay_upstream
from sandbox.replay import problem_text
from gateway.cli_store import summary
from gateway.trainer import train_routes
from store.database import open_database
from store.policy_store import PolicyStore
from store.training_lock import TrainingLock

KEYS = {"low": "k-low", "mid": "k-mid", "high": "k-high"}
TIERS = [
    {"name": "low", "weights": {"correct": 1.0, "helpful": 0.8, "harmless": 0.2}, "cost_weight": 0.0},
    {"name": "mid", "weights": {"correct": 1.0, "helpful": 0.5, "harmless": 0.5}, "cost_weight": 0.2},
    {"name": "high", "weights": {"correct": 1.0, "helpful": 0.2, "harmless": 0.8}, "cost_weight": 1.0},
]


def loop_config(replay, math_env, bon_env, **train) -> dict:
    return {
        "upstreams": {"replay-math": replay_upstream(replay.url, "replay-math"),
                      "replay-bon": replay_upstream(replay.url, "replay-bon")},
        "routes": [
            replay_route("math", "replay-math", math_env, base_url=replay.url, env_name="replay-math",
                         start={"default": {"prompt": "p6", "n": 1}}),  # p6: ~20% accurate
            replay_route("assist", "replay-bon", bon_env, base_url=replay.url, env_name="replay-bon",
                         start={"default": {"prompt": "p2", "n": 1}}),
        ],
        "tiers": TIERS, "default_tier": "low",
        "api_keys": [{"hash": hash_key(k), "tier": t} for t, k in KEYS.items()],
        "train": {"budget": 3000, "min_queries": 40, "concurrency": 16, **train},
        "seed": 5,
    }


def serve(gw, tier: str, model: str, queries) -> list[dict]:
    out = []
    with httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {KEYS[tier]}"}, timeout=30) as client:
        for q in queries:
            content = problem_text(q) if model == "math" else f"Query {q}: please help"
            r = client.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": content}]})
            assert r.status_code == 200, r.text
            out.append(r.json())
    return out


def mv_utility(responses, math_env, queries, lam: float) -> float:
    return float(np.mean([(r["iapo"]["answer"] == str(int(math_env.gold[q]))) - lam * r["iapo"]["cost"]
                          for r, q in zip(responses, queries)]))


def bon_utility(responses, weights, lam: float) -> float:
    return float(np.mean([weights[0] * r["iapo"]["scores"]["helpful"] + weights[1] * r["iapo"]["scores"]["harmless"]
                          - lam * r["iapo"]["cost"] for r in responses]))


def wait_for_version(gw, version: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while gw.gateway.policy.version != version:
        assert time.monotonic() < deadline, "gateway did not pick up the new policy"
        time.sleep(0.05)


@pytest.fixture
def loop(start_gateway, replay, math_env, synthetic_envs):
    return start_gateway(loop_config(replay, math_env, synthetic_envs["replay-bon"]))


def warm_up(gw, math_env, with_feedback=True):
    """120 served MATH requests (training queries 0..119), with gold feedback on each."""
    for i, tier in enumerate(("low", "mid", "high")):
        queries = range(40 * i, 40 * (i + 1))
        for r, q in zip(serve(gw, tier, "math", queries), queries):
            if with_feedback:
                f = httpx.post(f"{gw.url}/v1/feedback", json={"id": r["id"], "gold": str(int(math_env.gold[q]))},
                               headers={"authorization": f"Bearer {KEYS[tier]}"})
                assert f.status_code == 200
    gw.gateway.writer.flush()


def test_train_publishes_and_the_gateway_serves_the_better_arm(loop, start_gateway, replay, math_env, synthetic_envs):
    # "before" is measured on a twin gateway with its own store, so the fresh queries never reach training
    twin = start_gateway(loop_config(replay, math_env, synthetic_envs["replay-bon"]), name="twin")
    fresh = list(range(200, 316))
    before = {t["name"]: mv_utility(serve(twin, t["name"], "math", fresh), math_env, fresh, t["cost_weight"]) for t in TIERS}
    bon_fresh = list(range(100, 150))
    bon_before = {t["name"]: bon_utility(serve(twin, t["name"], "assist", bon_fresh),
                                         (t["weights"]["helpful"], t["weights"]["harmless"]), t["cost_weight"]) for t in TIERS}
    warm_up(loop, math_env)
    serve(loop, "low", "assist", range(0, 60))
    loop.gateway.writer.flush()

    start = time.monotonic()
    reports = asyncio.run(train_routes(loop.settings))
    wall = time.monotonic() - start
    for r in reports:
        print(summary(r))
    math_report, bon_report = reports
    assert math_report.status == bon_report.status == "published"
    assert math_report.queries == 120 and bon_report.queries == 60  # only the warm-up traffic of this gateway
    assert math_report.completions <= 3000 and bon_report.completions <= 3000
    assert math_report.saved_completions > 0  # served requests on training queries were reused
    wait_for_version(loop, bon_report.version)

    after = {t["name"]: mv_utility(serve(loop, t["name"], "math", fresh), math_env, fresh, t["cost_weight"]) for t in TIERS}
    bon_after = {t["name"]: bon_utility(serve(loop, t["name"], "assist", bon_fresh),
                                        (t["weights"]["helpful"], t["weights"]["harmless"]), t["cost_weight"]) for t in TIERS}
    print(f"wall {wall:.1f}s MV before {before} after {after}; BoN before {bon_before} after {bon_after}")
    for tier in before:
        # 116 fresh requests: a per-tier standard error of at most ~0.047; the margins are > 5 s.e.
        assert after[tier] - before[tier] > 0.25, (tier, before[tier], after[tier])
        assert bon_after[tier] - bon_before[tier] > 0.03, (tier, bon_before[tier], bon_after[tier])
    served = {t: loop.gateway.arm_for(loop.settings.route("math"), loop.settings.tier(t)) for t in before}
    assert all(arm.prompt_id != "p6" for arm in served.values())  # the poor starting prompt is gone everywhere
    db = sqlite_utils.Database(loop.db_path)
    explored = db.execute("select count(*), sum(n), sum(cost) from requests where kind = 'explore' and run_id = ?",
                          [math_report.run_id]).fetchone()
    assert explored[1] == math_report.completions
    assert explored[2] == pytest.approx(math_report.dollars)
    assert db.execute("select count(*) from completions c join requests r on r.id = c.request_id "
                      "where r.run_id = ?", [math_report.run_id]).fetchone()[0] == math_report.completions
    explore = [line for line in httpx.get(f"{loop.url}/metrics").text.splitlines()
               if line.startswith('iapo_spend_dollars{') and 'scope="explore"' in line and 'per_day' in line]
    assert sum(float(line.split()[-1]) for line in explore) == pytest.approx(math_report.dollars + bon_report.dollars)


def test_caps_are_exact_and_partial_runs_do_not_publish(loop, math_env):
    warm_up(loop, math_env)
    [report] = asyncio.run(train_routes(loop.settings, "math", budget=1234))
    assert report.status == "published" and report.completions <= 1234
    version = report.version
    [capped] = asyncio.run(train_routes(loop.settings, "math", budget=3000, max_dollars=0.75))
    assert capped.status == "unpublished" and "dollar cap" in capped.message
    assert capped.dollars <= 0.75
    db = sqlite_utils.Database(loop.db_path)
    spent = db.execute("select sum(cost) from requests where run_id = ?", [capped.run_id]).fetchone()[0]
    assert spent == pytest.approx(capped.dollars) and spent <= 0.75
    assert PolicyStore(open_database(loop.db_path)).latest_version() == version
    [partial] = asyncio.run(train_routes(loop.settings, "math", budget=3000, max_dollars=0.75, publish_partial=True))
    assert partial.status == "partial" and partial.version == version + 1


def test_missing_gold_is_refused_and_concurrent_run_is_refused(start_gateway, replay, math_env, synthetic_envs):
    cfg = loop_config(replay, math_env, synthetic_envs["replay-bon"])
    cfg["routes"][0].pop("verifier")
    gw = start_gateway(cfg)
    warm_up(gw, math_env, with_feedback=False)
    [report] = asyncio.run(train_routes(gw.settings, "math"))
    assert report.status == "refused" and "no gold" in report.message
    lock = TrainingLock(open_database(gw.db_path), "assist", "someone-else")
    lock.acquire()  # held by this (live) process under another run id
    serve(gw, "low", "assist", range(60))
    gw.gateway.writer.flush()
    [refused] = asyncio.run(train_routes(gw.settings, "assist"))
    assert refused.status == "refused" and "being trained" in refused.message
    lock.release()
    [ok] = asyncio.run(train_routes(gw.settings, "assist", budget=500))
    assert ok.status == "published"


def test_upstream_faults_abort_training_and_leave_serving_untouched(loop, math_env, replay, reset_faults):
    warm_up(loop, math_env)
    before = PolicyStore(open_database(loop.db_path)).latest_version()
    httpx.post(f"{replay.url}/admin/faults", json={"error_rate": 0.3, "error_status": 500})
    cfg = loop.settings.upstreams["replay-math"]
    cfg.retries = 0
    [report] = asyncio.run(train_routes(loop.settings, "math"))
    assert report.status == "aborted" and "unchanged" in report.message
    db = open_database(loop.db_path)
    assert PolicyStore(db).latest_version() == before
    assert db.execute("pragma integrity_check").fetchone()[0] == "ok"
    orphans = db.execute("select count(*) from completions c left join requests r on r.id = c.request_id "
                         "where r.id is null").fetchone()[0]
    assert orphans == 0
    assert db.execute("select count(*) from training_locks").fetchone()[0] == 0  # released
    httpx.post(f"{replay.url}/admin/faults", json={"error_rate": 0.0})
    [again] = asyncio.run(train_routes(loop.settings, "math", budget=800))
    assert again.status == "published"


def test_cli_dry_run_policy_show_diff_and_rollback(loop, math_env, capsys):
    warm_up(loop, math_env)
    config = str(loop.config_path)
    assert iapo(["train", "--config", config, "--route", "math", "--budget", "2000", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry-run" in out and "round  1" in out and "of budget 2000" in out
    assert PolicyStore(open_database(loop.db_path)).latest_version() == 0
    assert iapo(["train", "--config", config, "--route", "math", "--budget", "1500"]) == 0
    assert "published (version 1)" in capsys.readouterr().out
    wait_for_version(loop, 1)
    assert iapo(["policy", "--config", config, "show"]) == 0
    assert "math" in capsys.readouterr().out
    assert iapo(["policy", "--config", config, "diff", "0", "1"]) == 0
    assert "(start arm) ->" in capsys.readouterr().out
    assert iapo(["policy", "--config", config, "rollback", "0"]) == 0
    wait_for_version(loop, 2)
    arm = loop.gateway.arm_for(loop.settings.route("math"), loop.settings.tier("low"))
    assert (arm.prompt_id, arm.n) == ("p6", 1)  # back to the starting arm


def test_serve_trains_itself_on_an_interval_without_blocking(start_gateway, replay, math_env, synthetic_envs):
    cfg = loop_config(replay, math_env, synthetic_envs["replay-bon"], interval_seconds=1.0, budget=1500)
    cfg["routes"] = cfg["routes"][:1]
    gw = start_gateway(cfg)
    warm_up(gw, math_env)
    deadline = time.monotonic() + 60
    while gw.gateway.policy.version == 0:
        assert time.monotonic() < deadline, "scheduled training never published"
        serve(gw, "high", "math", [250])  # serving goes on (200s) while training runs in its thread
    arm = gw.gateway.arm_for(gw.settings.route("math"), gw.settings.tier("low"))
    assert arm.prompt_id != "p6"
