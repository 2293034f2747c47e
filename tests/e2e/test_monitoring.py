"""Monitoring: alert rules pass promtool, every dashboard query names exported metrics, a real
Prometheus scrapes the gateway, and two uvicorn workers report consistent counters."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import hash_key
from sandbox.demo import replay_route, replay_upstream
from sandbox.replay import problem_text
from conftest import serve_process
from sandbox.servers import free_port

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMQL_WORDS = {"sum", "by", "rate", "histogram_quantile", "clamp_min", "changes", "offset", "and", "on", "le"}


def require_tool(name: str) -> str:
    """Debian's prometheus package is installed by .ci/run: missing under CI=true fails, elsewhere skips."""
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{name} not found: .ci/run installs Debian's prometheus package")
    pytest.skip(f"{name} not installed (apt-get install prometheus)")


def monitored_config(replay, math_env, synthetic_envs) -> dict:
    return {
        "upstreams": {"replay-math": replay_upstream(replay.url, "replay-math"),
                      "replay-bon": replay_upstream(replay.url, "replay-bon")},
        "routes": [
            replay_route("math", "replay-math", math_env, base_url=replay.url, env_name="replay-math",
                         start={"default": {"prompt": "p4", "n": 4}}),
            replay_route("assist", "replay-bon", synthetic_envs["replay-bon"], base_url=replay.url,
                         env_name="replay-bon", start={"default": {"prompt": "p3", "n": 3}}),
        ],
        "tiers": [{"name": "paid", "cost_weight": 0.2, "caps": {"per_day": {"dollars": 0.4}}, "on_exhausted": "degrade"},
                  {"name": "tight", "cost_weight": 1.0, "caps": {"per_day": {"dollars": 0.01}}}],
        "default_tier": "paid",
        "api_keys": [{"hash": hash_key("k-paid"), "tier": "paid"}, {"hash": hash_key("k-tight"), "tier": "tight"}],
    }


def traffic(url: str, requests: int = 12) -> None:
    with httpx.Client(base_url=url, timeout=30) as c:
        for q in range(requests):
            r = c.post("/v1/chat/completions", headers={"authorization": "Bearer k-paid"},
                       json={"model": "math", "messages": [{"role": "user", "content": problem_text(q)}]})
            if r.status_code == 200 and q % 2 == 0:
                c.post("/v1/feedback", headers={"authorization": "Bearer k-paid"}, json={"id": r.json()["id"], "gold": "1"})
            c.post("/v1/chat/completions", headers={"authorization": "Bearer k-paid"},
                   json={"model": "assist", "messages": [{"role": "user", "content": f"Query {q}: hi"}]})
        c.post("/v1/chat/completions", headers={"authorization": "Bearer k-tight"},
               json={"model": "math", "messages": [{"role": "user", "content": problem_text(1)}]})


def exported(url: str) -> dict:
    text = httpx.get(f"{url}/metrics").text
    return {(s.name, frozenset(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_alert_rules_pass_promtool():
    promtool = require_tool("promtool")
    out = subprocess.run([promtool, "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_dashboard_and_alerts_only_use_exported_metrics(start_gateway, replay, math_env, synthetic_envs):
    gw = start_gateway(monitored_config(replay, math_env, synthetic_envs))
    traffic(gw.url)
    names = {name for name, _ in exported(gw.url)}
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "iapo.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = {m for e in exprs for m in re.findall(r"\b(iapo_[a-z0-9_]+)", e)}
    assert used and used <= names, f"not exported: {sorted(used - names)}"
    assert len(dashboard["panels"]) >= 12


def test_real_prometheus_scrapes_spend_and_quality(start_gateway, replay, math_env, synthetic_envs, tmp_path):
    prometheus = require_tool("prometheus")
    gw = start_gateway(monitored_config(replay, math_env, synthetic_envs))
    traffic(gw.url)
    port = free_port()
    (tmp_path / "prom.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "iapo", "static_configs": [{"targets": [gw.url.removeprefix("http://")]}]}]}))
    proc = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prom.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        expected = exported(gw.url)
        want_cost = sum(v for (n, ls), v in expected.items() if n == "iapo_cost_dollars_total")
        want_quality = sum(v for (n, ls), v in expected.items()
                           if n == "iapo_quality_count" and ("route", "assist") in ls)
        want_spend = expected[("iapo_spend_dollars", frozenset({("scope", "tier"), ("name", "paid"), ("window", "per_day")}))]

        def query(q: str) -> float | None:
            try:
                data = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": q}, timeout=5).json()
            except (httpx.HTTPError, ValueError):  # not up yet, or a plain-text "not ready" answer
                return None
            result = data.get("data", {}).get("result", [])
            return float(result[0]["value"][1]) if result else None

        deadline = time.monotonic() + 60
        while query("sum(iapo_cost_dollars_total)") is None or abs(query("sum(iapo_cost_dollars_total)") - want_cost) > 1e-9:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "Prometheus never scraped the gateway's spend"
            time.sleep(0.5)
        assert query('sum(iapo_quality_count{route="assist"})') == pytest.approx(want_quality)
        assert query('iapo_spend_dollars{scope="tier",name="paid",window="per_day"}') == pytest.approx(want_spend)
        assert query('sum(iapo_budget_rejections_total{tier="tight"})') == 1
        assert query("up") == 1
    finally:
        proc.terminate()
        proc.wait(10)


def test_two_workers_report_consistent_counters(tmp_path, replay, math_env, synthetic_envs):
    cfg = monitored_config(replay, math_env, synthetic_envs)
    cfg["store"] = {"path": str(tmp_path / "iapo.db")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    proc = serve_process(str(tmp_path / "c.yaml"), port, "--workers", "2")
    url = f"http://127.0.0.1:{port}"
    try:
        sent = 0
        for q in range(30):
            # a fresh connection per request, so both workers take some
            r = httpx.post(f"{url}/v1/chat/completions", headers={"authorization": "Bearer k-paid"},
                           json={"model": "math", "messages": [{"role": "user", "content": problem_text(q)}]})
            sent += r.status_code == 200
        totals = set()
        for _ in range(8):
            m = exported(url)
            totals.add((sum(v for (n, _), v in m.items() if n == "iapo_requests_total"),
                        sum(v for (n, ls), v in m.items() if n == "iapo_requests_total" and ("status", "200") in ls)))
        assert totals == {(30.0, float(sent))}  # every request is counted (429s too), whichever worker answers
    finally:
        proc.terminate()
        proc.wait(30)
