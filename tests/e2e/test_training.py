"""Training learns what each tier is served, on the serving runtime: feasible arms only, ranked arms for
degrade, a judge on another upstream, a concurrency share, resume after kill -9, and a CLI that never
ends in a traceback."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import httpx
import yaml

from gateway.config import hash_key, load_config
from gateway.trainer import train_routes
from sandbox.demo import demo_config, replay_route, replay_upstream
from sandbox.replay import problem_text
from store.database import open_database
from store.policy_store import PolicyEntry, PolicyStore
from policies.arms import Arm, RankedArm
from tests.support import metric_value, metrics_snapshot, wait_for

ENV = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}


def traffic(gw, key: str | None, model: str, queries, content=problem_text) -> None:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(base_url=gw.url, headers=headers, timeout=30) as client:
        for q in queries:
            r = client.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user",
                                                                                         "content": content(q)}]})
            assert r.status_code == 200, r.text
    gw.gateway.writer.flush()


def test_published_arms_fit_their_tiers_and_are_served_as_published(start_gateway, replay, synthetic_envs):
    """The demo config: tier mid has max_n 16 and high max_n 8 with a $0.08 cost cap per request."""
    cfg = demo_config(replay.url, "unused.db", synthetic_envs["replay-mv"], synthetic_envs["replay-bon"])
    cfg.pop("store")
    cfg["train"] = {"budget": 2500, "min_queries": 20}
    cfg["upstreams"] = {"replay-mv": replay_upstream(replay.url, "replay-mv"),
                        "replay-bon": replay_upstream(replay.url, "replay-bon")}
    gw = start_gateway(cfg)
    traffic(gw, "iapo-demo-low", "math", range(30))
    traffic(gw, "iapo-demo-low", "assist", range(30), content=lambda q: f"Query {q}: please help")
    reports = asyncio.run(train_routes(gw.settings))
    assert [r.status for r in reports] == ["published", "published"], [r.message for r in reports]
    settings = gw.settings
    wait_for(lambda: gw.gateway.policy.version == reports[-1].version)
    for report in reports:
        route = settings.route(report.route)
        for change in report.changes:
            tier = settings.tier(change.tier)
            assert change.ranked and change.ranked[0].arm == change.new
            for arm in change.ranked:
                assert arm.n <= (tier.max_n or route.n_max) and arm.n <= route.n_max
                if tier.max_cost_per_request:
                    body = {"messages": [{"role": "user", "content": problem_text(3)}],
                            **route.prompt(arm.prompt_id).params}
                    worst = gw.gateway.rt.route_worst_case(route, body)[0]
                    assert arm.n * worst <= tier.max_cost_per_request + 1e-9
        # served exactly as published: the N in the answer is the N in the policy
        for tier, key in (("mid", "iapo-demo-mid"), ("high", "iapo-demo-high")):
            published = next(c.new for c in report.changes if c.tier == tier)
            content = problem_text(3) if route.model == "math" else "Query 3: please help"
            r = httpx.post(f"{gw.url}/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                           json={"model": route.model, "messages": [{"role": "user", "content": content}]})
            assert (r.headers["x-iapo-prompt"], int(r.headers["x-iapo-n"])) == (published.prompt_id, published.n)


def test_degrade_serves_the_best_affordable_ranked_arm(start_gateway, replay, math_env):
    route = replay_route("math", "replay-math", math_env, base_url=replay.url, env_name="replay-math")
    route["prompts"][1]["params"] = {"temperature": 0.8, "max_tokens": 300}  # p1 is four times cheaper at worst
    cfg = {"upstreams": {"replay-math": replay_upstream(replay.url, "replay-math")}, "routes": [route],
           "tiers": [{"name": "team", "caps": {"per_day": {"dollars": 0.03}}, "on_exhausted": "degrade"}],
           "api_keys": [{"hash": hash_key("k"), "tier": "team"}]}
    gw = start_gateway(cfg)
    # p0 at N=4 reserves 4 × $0.012 = $0.048 > $0.03; the ranking says p1 at N=4 ($0.012) is next best
    ranked = (RankedArm("p0", 4, 0.80, 0.01, 0.03), RankedArm("p0", 2, 0.74, 0.01, 0.015),
              RankedArm("p1", 4, 0.72, 0.01, 0.01), RankedArm("p1", 1, 0.40, 0.02, 0.003))
    version = PolicyStore(open_database(gw.db_path)).publish([PolicyEntry("math", "team", Arm("p0", 4), 0.8, 0.01,
                                                                          ranked=ranked)])
    wait_for(lambda: gw.gateway.policy.version == version)
    before = metrics_snapshot(gw.url)
    r = httpx.post(f"{gw.url}/v1/chat/completions", headers={"authorization": "Bearer k"},
                   json={"model": "math", "messages": [{"role": "user", "content": problem_text(1)}]})
    assert r.status_code == 200
    # p0 at N=2 ($0.024) fits too and ranks above p1 at N=4: the best affordable arm is served
    assert (r.headers["x-iapo-prompt"], r.headers["x-iapo-n"], r.headers["x-iapo-degraded"]) == ("p0", "2", "budget")
    spent = gw.spend("tier:team")["dollars"]
    assert 0.03 - spent < 0.024  # now only the cheaper prompt fits
    r = httpx.post(f"{gw.url}/v1/chat/completions", headers={"authorization": "Bearer k"},
                   json={"model": "math", "messages": [{"role": "user", "content": problem_text(2)}]})
    assert r.status_code == 200 and (r.headers["x-iapo-prompt"], r.headers["x-iapo-n"]) in (("p1", "4"), ("p1", "1"))
    after = metrics_snapshot(gw.url)
    assert metric_value(after, "iapo_budget_degradations_total") - metric_value(before, "iapo_budget_degradations_total") == 2


def test_training_with_a_judge_scorer_on_a_second_upstream(start_gateway, replay, synthetic_envs):
    route = replay_route("assist", "replay-bon", synthetic_envs["replay-bon"], base_url=replay.url,
                         env_name="replay-bon", start={"default": {"prompt": "p0", "n": 2}}, n_max=4)
    route["prompts"] = route["prompts"][:4]
    route["objectives"] = [{"name": "graded", "scorer": {"type": "judge", "upstream": "judge"}, "low": 0, "high": 10}]
    cfg = {"upstreams": {"replay-bon": replay_upstream(replay.url, "replay-bon"),
                         "judge": replay_upstream(replay.url, "judge")},
           "routes": [route], "tiers": [{"name": "t"}], "train": {"budget": 300, "min_queries": 10}}
    gw = start_gateway(cfg)
    traffic(gw, None, "assist", range(12), content=lambda q: f"Query {q}: please help")
    [report] = asyncio.run(train_routes(gw.settings))
    assert report.status == "published", report.message
    graded = gw.rows("select c.scores from completions c join requests r on r.id = c.request_id"
                     " where r.kind = 'explore' limit 5")
    assert graded and all(row["scores"] for row in graded)


def test_training_takes_at_most_its_share_of_the_upstreams_concurrency(start_gateway, scripted):
    scripted.script.update({"contents": ["short", "a longer answer", "the longest answer of all"], "latency": 0.02})
    up = {"model": "openai/scripted", "api_base": f"{scripted.url}/v1", "max_concurrency": 8,
          "price": {"prompt_per_1k": 0.0, "completion_per_1k": 0.01}}
    route = {"model": "chat", "upstream": "up", "aggregator": "bon", "n_max": 4,
             "prompts": [{"id": f"p{i}", "system": f"Style {i}"} for i in range(4)],
             "objectives": [{"name": "length", "scorer": {"type": "length", "target_chars": 15}}],
             "start": {"default": {"prompt": "p0", "n": 2}}}
    cfg = {"upstreams": {"up": up}, "routes": [route], "tiers": [{"name": "t"}],
           "train": {"budget": 400, "min_queries": 10, "concurrency": 32, "max_share": 0.25}}
    gw = start_gateway(cfg)
    traffic(gw, None, "chat", range(12), content=lambda q: f"Question {q}")
    scripted.clear_stats()
    [report] = asyncio.run(train_routes(gw.settings))
    assert report.status == "published", report.message
    assert scripted.stats["requests"] > 20
    assert scripted.stats["max_in_flight"] == 2  # 25% of the upstream's 8 slots; serving keeps the other 6


def _train(config: str, *extra: str, wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "gateway.cli", "train", "--config", config, *extra]
    if wait:
        return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _explore_spend(db_path: str) -> tuple[int, float]:
    db = open_database(db_path)
    count, dollars = db.execute("select count(*), coalesce(sum(cost), 0) from requests where kind = 'explore'"
                                ).fetchone()
    return count, round(dollars, 9)


def test_a_killed_run_resumes_and_spends_what_one_run_spends(tmp_path, start_gateway, replay, math_env, reset_faults):
    """Two stores served the same queries; one trains uninterrupted, the other is killed mid-run and
    rerun. Draws are reproducible (train.pull_seeds with a replay that honours `seed`), so both must buy
    the same completions in total and publish the same policy."""
    def setup(name: str):
        route = replay_route("math", "replay-math", math_env, base_url=replay.url, env_name="replay-math",
                             start={"default": {"prompt": "p4", "n": 1}})
        cfg = {"upstreams": {"replay-math": replay_upstream(replay.url, "replay-math")}, "routes": [route],
               "tiers": [{"name": "low"}, {"name": "high", "cost_weight": 1.0}],
               "train": {"budget": 3000, "min_queries": 20, "concurrency": 4, "reuse_served": False,
                         "pull_seeds": True, "seed": 11}}
        gw = start_gateway(cfg, name=name)
        traffic(gw, None, "math", range(40))
        gw.stop()
        return gw

    whole, killed = setup("whole"), setup("killed")
    done = _train(str(whole.config_path))
    assert done.returncode == 0, done.stdout + done.stderr
    httpx.post(f"{replay.url}/admin/faults", json={"latency_ms": 40})  # slow pulls: the kill lands mid-run
    proc = _train(str(killed.config_path), wait=False)
    wait_for(lambda: _explore_spend(killed.db_path)[0] >= 30, timeout=60, interval=0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    partial = _explore_spend(killed.db_path)
    httpx.post(f"{replay.url}/admin/faults", json={"latency_ms": 0})
    again = _train(str(killed.config_path))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resumed run" in again.stdout
    assert partial[0] < _explore_spend(whole.db_path)[0]
    assert _explore_spend(killed.db_path) == _explore_spend(whole.db_path)
    a = PolicyStore(open_database(whole.db_path)).entries(1)
    b = PolicyStore(open_database(killed.db_path)).entries(1)
    assert [(e.tier, e.arm) for e in a] == [(e.tier, e.arm) for e in b]
    runs = open_database(killed.db_path).execute("select count(*), max(status) from training_runs").fetchone()
    assert runs == (1, "published")


def test_cli_commands_end_in_a_message_not_a_traceback(tmp_path, start_gateway, replay, math_env):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "upstreams": {"u": replay_upstream(replay.url, "replay-math")},
        "routes": [replay_route("math", "u", math_env, base_url=replay.url, env_name="replay-math")],
        "store": {"path": str(tmp_path / "iapo.db")}}))
    open_database(str(tmp_path / "iapo.db"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("routes: [{model: x}]\n")
    cases = [
        (["policy", "--config", str(cfg_path), "rollback", "7"], 2, "policy version 7 does not exist"),
        (["policy", "--config", str(cfg_path), "show", "3"], 2, "policy version 3 does not exist"),
        (["policy", "--config", str(cfg_path), "diff", "0", "5"], 2, "policy version 5 does not exist"),
        (["policy", "--db", str(tmp_path / "missing" / "x.db"), "list"], 2, "does not exist"),
        (["policy", "--db", str(tmp_path / "nothing.db"), "list"], 2, "no store at"),
        (["train", "--config", str(bad)], 2, "invalid configuration"),
        (["train", "--config", str(cfg_path), "--route", "nope"], 2, "no route named 'nope'"),
        (["train", "--config", str(cfg_path)], 2, "usable training queries"),
        (["keys", "--config", str(cfg_path), "revoke", "nobody"], 1, "no active key"),
        (["keys", "--config", str(cfg_path), "create", "--tier", "gold"], 2, "tier 'gold' is not one of"),
    ]
    for args, code, message in cases:
        out = subprocess.run([sys.executable, "-m", "gateway.cli", *args], env=ENV, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == code, (args, out.returncode, out.stderr)
        assert message in out.stderr + out.stdout, (args, out.stderr)
        assert "Traceback" not in out.stderr, (args, out.stderr)


def test_policy_show_prints_the_published_arm_and_its_ranked_alternatives(tmp_path, capsys):
    from gateway.cli import main as iapo

    db_path = str(tmp_path / "iapo.db")
    ranked = (RankedArm("p4", 11, 0.71, 0.02, 0.08), RankedArm("p1", 3, 0.66, 0.03, 0.02))
    PolicyStore(open_database(db_path)).publish([PolicyEntry("math", "mid", Arm("p4", 11), 0.71, 0.02, 500, ranked)])
    assert iapo(["policy", "--db", db_path, "show"]) == 0
    out = capsys.readouterr().out
    assert "prompt=p4" in out and "n=11" in out and "value 0.7100 ± 0.0200" in out
    assert "or p1" in out and "n=3" in out and "cost $0.02000" in out


def test_the_train_line_iapo_demo_prints_works_from_any_folder(tmp_path):
    """`iapo demo` run in one folder prints `iapo train --config X`; run from another folder, that config
    must name the demo's store, not a new empty one."""
    from sandbox.servers import free_port

    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir(), elsewhere.mkdir()
    demo = subprocess.Popen([sys.executable, "-m", "gateway.cli", "demo", "--port", str(free_port()),
                             "--upstream-port", str(free_port())], cwd=here, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        line = next(l for l in demo.stdout if "iapo train --config" in l)
    finally:
        demo.terminate()
        demo.wait(30)
    config = line.split("--config", 1)[1].strip()
    assert load_config(config).store.path == str(here / "iapo.db")
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "train", "--config", config, "--dry-run"], cwd=elsewhere,
                         env=ENV, capture_output=True, text=True, timeout=120)
    assert "0 usable training queries" in out.stdout and not (elsewhere / "iapo.db").exists()
