"""Processes, not threads: SIGTERM drains in-flight requests and loses no log row; a training run
killed with SIGKILL leaves the serving policy and the store intact, and the next run starts cleanly."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import yaml

from sandbox.demo import replay_route, replay_upstream
from sandbox.replay import problem_text
from sandbox.servers import free_port
from store.database import open_database
from store.policy_store import PolicyStore

ENV = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}


def write_config(tmp_path, replay, math_env, **train) -> str:
    cfg = {
        "upstreams": {"replay-math": replay_upstream(replay.url, "replay-math")},
        "routes": [replay_route("math", "replay-math", math_env, base_url=replay.url, env_name="replay-math",
                                start={"default": {"prompt": "p6", "n": 4}})],
        "tiers": [{"name": "low", "cost_weight": 0.0}, {"name": "high", "cost_weight": 1.0}],
        "store": {"path": str(tmp_path / "iapo.db")},
        "train": {"min_queries": 20, "concurrency": 4, **train},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def start_gateway(config: str, port: int) -> subprocess.Popen:
    from conftest import serve_process

    return serve_process(config, port)


def test_sigterm_drains_in_flight_requests_and_flushes_the_log(tmp_path, replay, math_env, reset_faults):
    config = write_config(tmp_path, replay, math_env)
    port = free_port()
    proc = start_gateway(config, port)
    httpx.post(f"{replay.url}/admin/faults", json={"latency_ms": 150})  # keep requests in flight
    ok_ids: list[str] = []

    async def fire():
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            async def one(q):
                try:
                    r = await client.post("/v1/chat/completions",
                                          json={"model": "math", "messages": [{"role": "user", "content": problem_text(q)}]})
                    if r.status_code == 200:
                        ok_ids.append(r.json()["id"])
                except httpx.HTTPError:
                    pass  # refused after shutdown began: never acknowledged, so not owed a log row
            tasks = [asyncio.create_task(one(q)) for q in range(60)]
            await asyncio.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            await asyncio.gather(*tasks)

    asyncio.run(fire())
    assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a graceful shutdown
    assert len(ok_ids) >= 5
    db = open_database(str(tmp_path / "iapo.db"))
    rows = {r[0] for r in db.execute("select id from requests where status = 200")}
    assert rows == set(ok_ids)
    per_request = dict(db.execute("select request_id, count(*) from completions group by request_id").fetchall())
    assert all(per_request[i] == 4 for i in ok_ids)
    assert db.execute("pragma integrity_check").fetchone()[0] == "ok"


def test_killed_training_run_leaves_serving_untouched_and_restarts_cleanly(tmp_path, replay, math_env, reset_faults):
    config = write_config(tmp_path, replay, math_env, budget=4000)
    port = free_port()
    proc = start_gateway(config, port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            for q in range(40):
                r = client.post("/v1/chat/completions", json={"model": "math", "messages": [{"role": "user", "content": problem_text(q)}]})
                assert r.status_code == 200
        time.sleep(1.5)  # the writer flushes; training reads what is on disk
        httpx.post(f"{replay.url}/admin/faults", json={"latency_ms": 40})
        train = subprocess.Popen([sys.executable, "-m", "gateway.cli", "train", "--config", config],
                                 env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        db = open_database(str(tmp_path / "iapo.db"))
        deadline = time.monotonic() + 60
        while db.execute("select count(*) from requests where kind = 'explore'").fetchone()[0] == 0:
            assert time.monotonic() < deadline and train.poll() is None, train.stdout.read().decode()[-2000:]
            time.sleep(0.1)
        train.send_signal(signal.SIGKILL)
        train.wait(10)
        assert PolicyStore(db).latest_version() == 0
        assert db.execute("pragma integrity_check").fetchone()[0] == "ok"
        assert db.execute("select count(*) from training_locks").fetchone()[0] == 1  # stale: its pid is gone
        per_request = db.execute("select r.n, count(c.idx) from requests r join completions c on c.request_id = r.id "
                                 "where r.kind = 'explore' group by r.id").fetchall()
        assert per_request and all(n == count for n, count in per_request)  # no half-written pull
        served = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                            json={"model": "math", "messages": [{"role": "user", "content": problem_text(3)}]})
        assert served.status_code == 200 and served.headers["x-iapo-policy-version"] == "0"
        httpx.post(f"{replay.url}/admin/faults", json={"latency_ms": 0})
        again = subprocess.run([sys.executable, "-m", "gateway.cli", "train", "--config", config, "--budget", "1500"],
                               env=ENV, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "published (version 1)" in again.stdout
        deadline = time.monotonic() + 10
        while httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                         json={"model": "math", "messages": [{"role": "user", "content": problem_text(3)}]}
                         ).headers["x-iapo-policy-version"] != "1":
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(30)


def test_sighup_reloads_the_config_in_a_running_process(tmp_path, replay, math_env):
    config = write_config(tmp_path, replay, math_env)
    data = yaml.safe_load(open(config))
    data["store"]["policy_poll_seconds"] = 3600  # only the signal can trigger the reload
    open(config, "w").write(yaml.safe_dump(data))
    port = free_port()
    proc = start_gateway(config, port)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    body = {"model": "math", "messages": [{"role": "user", "content": problem_text(2)}]}
    try:
        assert httpx.post(url, json=body).headers["x-iapo-n"] == "4"
        data["routes"][0]["start"] = {"default": {"prompt": "p4", "n": 7}}
        open(config, "w").write(yaml.safe_dump(data))
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while httpx.post(url, json=body).headers["x-iapo-n"] != "7":
            assert time.monotonic() < deadline, "SIGHUP did not reload the config"
            time.sleep(0.1)
        assert proc.poll() is None  # still serving: SIGHUP did not end the process
    finally:
        proc.terminate()
        proc.wait(30)


def test_kill_9_under_load_keeps_the_store_whole(replay):
    """kill -9 mid-load, restart: integrity ok, nothing half-written, at most the queue's content lost."""
    from bench.load import Stack, check_store, drive

    stack = Stack(n=4, workers=1, transport="litellm", mix=False, queue_size=500)
    try:
        async def load_and_kill():
            task = asyncio.create_task(drive(stack.url, seconds=6, concurrency=8, mix=False))
            await asyncio.sleep(3)
            stack.kill_gateway(signal.SIGKILL)
            return await task

        result = asyncio.run(load_and_kill())
        stack.start_gateway()
        store = check_store(str(stack.work / "iapo.db"), result["served"])
        assert result["ok"] > 20
        assert store["integrity"] == "ok"
        assert store["half_written"] == 0 and store["orphan_completions"] == 0 and store["wrong_completion_count"] == 0
        assert store["missing_rows"] <= 500  # bounded by store.queue_size
        after = asyncio.run(drive(stack.url, seconds=1, concurrency=2, mix=False))
        assert after["ok"] > 0
    finally:
        stack.stop()


def test_a_tier_header_cannot_override_the_keys_tier(start_gateway, replay, math_env):
    from gateway.config import hash_key

    cfg = {"upstreams": {"u": replay_upstream(replay.url, "replay-math")},
           "routes": [replay_route("math", "u", math_env, base_url=replay.url, env_name="replay-math")],
           "tiers": [{"name": "free"}, {"name": "enterprise"}], "default_tier": "free",
           "api_keys": [{"hash": hash_key("k-free"), "tier": "free"}]}
    gw = start_gateway(cfg)
    for headers in ({"authorization": "Bearer k-free", "x-iapo-tier": "enterprise"}, {"x-iapo-tier": "enterprise"},
                    {"authorization": "Bearer k-free", "openai-organization": "enterprise"}):
        r = httpx.post(f"{gw.url}/v1/chat/completions", headers=headers,
                       json={"model": "math", "messages": [{"role": "user", "content": problem_text(1)}]})
        assert r.status_code == 200 and r.json()["iapo"]["tier"] == "free"
