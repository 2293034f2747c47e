"""Exploration at batch prices: each PSST round is one batch job on the replay upstream's Batches API;
the run learns what a live run with the same seed learns, is billed at the batch price, and survives
`iapo train` exiting while a batch is out."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import httpx
import pytest

from gateway.trainer import train_routes
from sandbox.demo import replay_route, replay_upstream
from sandbox.replay import problem_text
from store.database import open_database
from store.policy_store import PolicyStore

ENV = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}


def config(replay, math_env, **train) -> dict:
    route = replay_route("math", "replay-math", math_env, base_url=replay.url, env_name="replay-math",
                         start={"default": {"prompt": "p4", "n": 1}})
    route["prompts"] = route["prompts"][:8]
    return {"upstreams": {"replay-math": replay_upstream(replay.url, "replay-math", batch_discount=0.5)},
            "routes": [route], "tiers": [{"name": "low"}, {"name": "high", "cost_weight": 1.0}],
            "train": {"budget": 800, "min_queries": 20, "reuse_served": False, "pull_seeds": True, "seed": 4,
                      "batch_poll_seconds": 0.1, **train}}


def serve_traffic(gw) -> None:
    with httpx.Client(base_url=gw.url, timeout=30) as client:
        for q in range(30):
            r = client.post("/v1/chat/completions",
                            json={"model": "math", "messages": [{"role": "user", "content": problem_text(q)}]})
            assert r.status_code == 200
    gw.gateway.writer.flush()


def explore_rows(db_path: str) -> tuple[int, float, int]:
    db = open_database(db_path)
    count, dollars, tokens = db.execute("select count(*), coalesce(sum(cost), 0), coalesce(sum(completion_tokens), 0)"
                                        " from requests where kind = 'explore'").fetchone()
    return count, round(dollars, 9), tokens


def test_batch_mode_learns_what_live_mode_learns_at_half_the_price(start_gateway, replay, math_env):
    live = start_gateway(config(replay, math_env), name="live")
    batch = start_gateway(config(replay, math_env, mode="batch"), name="batch")
    for gw in (live, batch):
        serve_traffic(gw)
    before = httpx.get(f"{replay.url}/admin/stats").json()["requests"]
    [live_report] = asyncio.run(train_routes(live.settings))
    [batch_report] = asyncio.run(train_routes(batch.settings))
    assert live_report.status == batch_report.status == "published", batch_report.message
    # one batch job per round, not one call per pull (the live run made a call per pull)
    jobs = open_database(batch.db_path).query("select round, status, requests from training_batches")
    assert len(jobs) == len(batch_report.rounds) and all(j["status"] == "completed" for j in jobs)
    calls = httpx.get(f"{replay.url}/admin/stats").json()["requests"] - before
    assert calls == sum(r["pulls"] for r in live_report.rounds)  # the live run's calls only
    live_rows, batch_rows = explore_rows(live.db_path), explore_rows(batch.db_path)
    assert live_rows[0] == batch_rows[0] and live_rows[2] == batch_rows[2]  # the same pulls, the same tokens
    assert batch_rows[1] == pytest.approx(live_rows[1] * 0.5)  # billed at the batch price
    assert batch_report.dollars == pytest.approx(live_report.dollars * 0.5)
    a = PolicyStore(open_database(live.db_path)).entries(1)
    b = PolicyStore(open_database(batch.db_path)).entries(1)
    assert [(e.tier, e.arm) for e in a] == [(e.tier, e.arm) for e in b]


def test_iapo_train_exits_while_a_batch_is_out_and_the_next_call_continues_the_run(start_gateway, replay, math_env,
                                                                                   tmp_path):
    gw = start_gateway(config(replay, math_env, mode="batch"))
    serve_traffic(gw)
    httpx.post(f"{replay.url}/admin/batches", json={"delay_s": 1.5})
    try:
        cmd = [sys.executable, "-m", "gateway.cli", "train", "--config", str(gw.config_path)]
        first = subprocess.run(cmd + ["--no-wait"], env=ENV, capture_output=True, text=True, timeout=120)
        assert first.returncode == 0 and "waiting" in first.stdout, first.stdout + first.stderr
        status = subprocess.run(cmd + ["--status"], env=ENV, capture_output=True, text=True, timeout=60)
        assert "round  1: batch" in status.stdout and "submitted" in status.stdout, status.stdout
        run_id = open_database(gw.db_path).execute("select run_id from training_runs").fetchone()[0]
        httpx.post(f"{replay.url}/admin/batches", json={"delay_s": 0.1})
        done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and "published" in done.stdout, done.stdout + done.stderr
    finally:
        httpx.post(f"{replay.url}/admin/batches", json={"delay_s": 0.5})
    db = open_database(gw.db_path)
    assert db.execute("select count(distinct run_id), max(status) from training_runs").fetchone() == (1, "published")
    assert db.execute("select run_id from training_runs").fetchone()[0] == run_id
    rounds = db.query("select round, batch_id from training_batches order by round")
    assert rounds[0]["round"] == 1 and len({r["batch_id"] for r in rounds}) == len(rounds)  # round 1 submitted once


def test_a_batch_with_failed_lines_logs_what_came_back_and_the_next_run_buys_only_the_rest(start_gateway, replay,
                                                                                            math_env):
    gw = start_gateway(config(replay, math_env, mode="batch"))
    serve_traffic(gw)
    cmd = [sys.executable, "-m", "gateway.cli", "train", "--config", str(gw.config_path)]
    httpx.post(f"{replay.url}/admin/batches", json={"delay_s": 0.1, "fail_every": 3})
    try:
        first = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        httpx.post(f"{replay.url}/admin/batches", json={"delay_s": 0.5, "fail_every": 0})
    assert first.returncode == 1 and "unanswered" in first.stdout + first.stderr, first.stdout + first.stderr
    db = open_database(gw.db_path)
    answered = db.execute("select count(*) from requests where kind = 'explore'").fetchone()[0]
    assert answered > 0  # the lines that came back were paid for, and are logged
    assert db.execute("select status from training_batches where round = 1").fetchone()[0] == "consumed"
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "published" in done.stdout, done.stdout + done.stderr
    pulls = db.execute("select count(*), count(distinct run_pull), count(distinct run_id) from requests"
                       " where kind = 'explore'").fetchone()
    assert pulls[0] == pulls[1] and pulls[2] == 1  # one run, and no pull bought twice


def test_a_batch_whose_id_was_never_recorded_is_found_by_its_tag_not_bought_again(start_gateway, replay,
                                                                                   math_env):
    gw = start_gateway(config(replay, math_env, mode="batch"))
    serve_traffic(gw)
    cmd = [sys.executable, "-m", "gateway.cli", "train", "--config", str(gw.config_path)]
    httpx.post(f"{replay.url}/admin/batches", json={"delay_s": 1.0})
    try:
        first = subprocess.run(cmd + ["--no-wait"], env=ENV, capture_output=True, text=True, timeout=120)
        assert first.returncode == 0 and "waiting" in first.stdout, first.stdout + first.stderr
        db = open_database(gw.db_path)
        run_id = db.execute("select run_id from training_runs").fetchone()[0]
        with db.transaction():  # as if the process had died between submitting and recording the batch
            db.execute("delete from training_batches")
        done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and "published" in done.stdout, done.stdout + done.stderr
    finally:
        httpx.post(f"{replay.url}/admin/batches", json={"delay_s": 0.5})
    mine = [b for b in httpx.get(f"{replay.url}/v1/batches", params={"limit": 1000}).json()["data"]
            if (b.get("metadata") or {}).get("iapo_run") == run_id]
    rounds = [b["metadata"]["iapo_round"] for b in mine]
    assert rounds.count("1") == 1 and len(rounds) == len(set(rounds))  # round 1 adopted, no round bought twice
