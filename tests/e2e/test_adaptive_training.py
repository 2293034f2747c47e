"""Training chooses sequential arms: on a tier with `adaptive: {rule: learned}`, `iapo train` values the
chosen prompt's sequential arms from the engine's pooled answer counts and publishes one when it is worth
at least the fixed arm; the gateway then serves it in waves."""
from __future__ import annotations

import asyncio

import httpx

from gateway.trainer import train_routes
from sandbox.replay import problem_text
from store.database import open_database
from store.policy_store import PolicyStore
from tests.e2e.test_batch_training import config, serve_traffic
from tests.support import wait_for

WAVES = {"rule": "learned", "first_wave": 4, "wave": 4}


def test_a_learned_tier_gets_a_sequential_arm_and_is_served_in_waves(start_gateway, replay, math_env):
    cfg = config(replay, math_env)
    cfg["tiers"] = [{"name": "low", "adaptive": WAVES}, {"name": "high", "cost_weight": 1.0},
                    {"name": "fixed-low"}, {"name": "exact-low", "adaptive": {**WAVES, "tolerance": 0}}]
    cfg["routes"][0]["start"] = {"default": {"prompt": "p4", "n": 8}}
    cfg["train"]["budget"] = 1500
    gw = start_gateway(cfg)
    serve_traffic(gw)
    [report] = asyncio.run(train_routes(gw.settings))
    assert report.status == "published", report.message
    policy = PolicyStore(open_database(gw.db_path)).load()
    low, fixed_low = policy.arm_for("math", "low"), policy.arm_for("math", "fixed-low")
    # λ = 0: `likely` is within the default tolerance of the fixed arm's value for fewer completions than
    # `settled`, so the learned tier takes it; with no tolerance, `settled` (the fixed arm's exact answers);
    # the same context without `adaptive` keeps the fixed arm
    assert low.stop == "likely0.001" and policy.arm_for("math", "exact-low").stop == "settled"
    assert fixed_low.stop is None and policy.arm_for("math", "high").stop is None
    assert report.sequential["low"]["completions"] < low.n
    assert low.prompt_id == fixed_low.prompt_id
    with httpx.Client(base_url=gw.url, timeout=30) as client:
        ask = {"model": "math", "messages": [{"role": "user", "content": problem_text(0)}]}
        wait_for(lambda: client.post("/v1/chat/completions", json=ask).headers["x-iapo-policy-version"]
                 == str(report.version))
        served = []
        for q in range(6):
            r = client.post("/v1/chat/completions",
                            json={"model": "math", "messages": [{"role": "user", "content": problem_text(q)}]})
            # anonymous callers get the first tier, `low`
            assert r.status_code == 200
            served.append(r.json()["iapo"])
    assert all(s["n"] == low.n and 1 <= s["waves"] <= low.n and s["completions"] <= low.n for s in served)
