"""The admin API over loopback: admin keys only, secrets shown once, spend equal to the ledger, policy
versions and rollback, training runs, recent requests with their completions, a redacted config."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from gateway.config import hash_key
from gateway.trainer import train_routes
from sandbox.demo import replay_route, replay_upstream
from sandbox.replay import problem_text
from store.database import open_database
from store.spend import SpendLedger
from tests.support import wait_for

ADMIN, CALLER = "admin-secret-1", "caller-secret-1"
ENDPOINTS = [("get", "/admin/keys"), ("post", "/admin/keys"), ("post", "/admin/keys/x/revoke"), ("get", "/admin/spend"),
             ("get", "/admin/policies"), ("get", "/admin/policies/latest"), ("get", "/admin/policies/diff?a=0&b=0"),
             ("post", "/admin/policies/rollback"), ("get", "/admin/training/runs"), ("get", "/admin/training/runs/x"),
             ("get", "/admin/requests"), ("get", "/admin/requests/x"), ("get", "/admin/config"),
             ("get", "/admin/actions")]


def admin_config(replay, math_env) -> dict:
    return {
        "upstreams": {"replay-math": replay_upstream(replay.url, "replay-math", api_key_env="IAPO_TEST_SECRET")},
        "routes": [replay_route("math", "replay-math", math_env, base_url=replay.url, env_name="replay-math",
                                start={"default": {"prompt": "p4", "n": 3}})],
        "tiers": [{"name": "team", "caps": {"per_day": {"dollars": 5.0}}, "key_caps": {"per_day": {"dollars": 2.0}}},
                  {"name": "free", "caps": {"per_day": {"dollars": 1.0}}}],
        "api_keys": [{"hash": hash_key(CALLER), "tier": "team", "name": "configured"}],
        "admin_keys": [{"hash": hash_key(ADMIN), "name": "ops-alice"}],
        "train": {"budget": 600, "min_queries": 10},
    }


@pytest.fixture
def gw(start_gateway, replay, math_env):
    return start_gateway(admin_config(replay, math_env))


def call(gw, method: str, path: str, key: str | None = ADMIN, **kwargs) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, f"{gw.url}{path}", headers=headers, timeout=30, **kwargs)


def ask(gw, key: str, q: int = 1, model: str = "math") -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=30,
                      json={"model": model, "messages": [{"role": "user", "content": problem_text(q)}]})


@pytest.mark.parametrize("method, path", ENDPOINTS)
def test_every_endpoint_refuses_anonymous_and_caller_keys(gw, method, path):
    r = call(gw, method, path, key=None, json={})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = call(gw, method, path, key=CALLER, json={})
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_key_required"
    assert call(gw, method, path, key="not-a-key", json={}).status_code == 401


def test_keys_secrets_are_shown_once_and_revocation_takes(gw):
    r = call(gw, "post", "/admin/keys", json={"tier": "team", "name": "ci", "models": ["math"],
                                              "caps": {"per_day": {"dollars": 0.05}}})
    assert r.status_code == 200, r.text
    created = r.json()
    secret = created["key"]
    assert secret.startswith("iapo-") and created["id"] == hash_key(secret)[7:23]
    listed = call(gw, "get", "/admin/keys").json()["data"]
    assert [k["name"] for k in listed] == ["ci"] and secret not in json.dumps(listed)
    assert hash_key(secret) not in json.dumps(listed)  # not even the full hash
    assert call(gw, "post", "/admin/keys", json={"tier": "team", "name": "ci"}).status_code == 409
    assert call(gw, "post", "/admin/keys", json={"tier": "nope"}).json()["error"]["code"] == "unknown_tier"
    # the key works, within its own models and caps
    assert ask(gw, secret).status_code == 200
    spent = [row for row in call(gw, "get", "/admin/spend").json()["data"] if row["scope"] == "key" and row["name"] == "ci"]
    assert spent[0]["cap_dollars"] == 0.05 and spent[0]["dollars"] > 0
    r = call(gw, "post", f"/admin/keys/{created['id']}/revoke")
    assert r.json() == {"revoked": 1}
    assert ask(gw, secret).status_code == 401
    actions = call(gw, "get", "/admin/actions").json()["data"]
    assert [(a["admin"], a["action"]) for a in actions[:2]] == [("ops-alice", "key.revoke"), ("ops-alice", "key.create")]
    assert secret not in json.dumps(actions)


def test_an_admin_key_made_by_the_cli_works_and_cannot_call_models(gw, capsys):
    from gateway.cli import main as iapo

    assert iapo(["keys", "--config", str(gw.config_path), "create", "--admin", "--name", "ops-bob"]) == 0
    secret = capsys.readouterr().out.split()[0]
    assert call(gw, "get", "/admin/keys", key=secret).status_code == 200
    assert ask(gw, secret).status_code == 401


def test_spend_figures_equal_the_ledger(gw):
    for q in range(4):
        assert ask(gw, CALLER, q).status_code == 200
    report = call(gw, "get", "/admin/spend").json()["data"]
    ledger = SpendLedger(open_database(gw.db_path))
    current = {(r["scope"], r["window"]): r for r in ledger.current()}
    team = next(r for r in report if (r["scope"], r["name"], r["window"]) == ("tier", "team", "per_day"))
    assert team["dollars"] == pytest.approx(current[("tier:team", "per_day")]["dollars"]) and team["dollars"] > 0
    assert team["cap_dollars"] == 5.0 and team["used_ratio"] == pytest.approx(team["dollars"] / 5.0)
    key = next(r for r in report if r["scope"] == "key")
    assert key["name"] == "configured" and key["cap_dollars"] == 2.0
    assert key["dollars"] == pytest.approx(current[(f"key:{hash_key(CALLER)[7:23]}", "per_day")]["dollars"])
    assert all(r["resets_at"] > 0 for r in report)


def test_policies_training_runs_and_rollback_change_what_is_served(gw):
    for q in range(12):
        assert ask(gw, CALLER, q).status_code == 200
    gw.gateway.writer.flush()
    [report] = asyncio.run(train_routes(gw.settings))
    assert report.status == "published", report.message
    runs = call(gw, "get", "/admin/training/runs").json()["data"]
    assert runs[0]["status"] == "published" and runs[0]["version"] == report.version
    run = call(gw, "get", f"/admin/training/runs/{runs[0]['run_id']}").json()
    assert run["spent"] == report.completions and run["trajectory"]["team"]
    curves = run["curves"]["team"]  # value at each N of the top prompts, as numbers
    assert isinstance(curves, dict) and curves
    assert all(isinstance(v, (int, float)) for values in curves.values() for v in values if v is not None)
    view = call(gw, "get", "/admin/policies/latest").json()
    entry = next(e for e in view["entries"] if e["tier"] == "team")
    assert entry["ranked"] and entry["value"] is not None and entry["value_se"] is not None
    assert call(gw, "get", f"/admin/policies/diff?a=0&b={report.version}").json()["changes"]
    assert call(gw, "get", "/admin/policies/99").status_code == 404
    wait_for(lambda: ask(gw, CALLER).headers["x-iapo-policy-version"] == str(report.version))
    r = call(gw, "post", "/admin/policies/rollback", json={"version": 0})
    assert r.status_code == 200 and r.json()["copy_of"] == 0
    wait_for(lambda: ask(gw, CALLER).headers["x-iapo-policy-version"] == str(r.json()["version"]))
    assert ask(gw, CALLER).headers["x-iapo-n"] == "3"  # the start arm again
    assert call(gw, "post", "/admin/policies/rollback", json={"version": "x"}).status_code == 400


def test_recent_requests_with_their_completions_and_votes(gw):
    answered = ask(gw, CALLER, 5).json()
    gw.gateway.writer.flush()
    listed = call(gw, "get", "/admin/requests?route=math&tier=team&status=200").json()["data"]
    assert listed[0]["id"] == answered["id"]
    assert call(gw, "get", "/admin/requests?status=404").json()["data"] == []
    detail = call(gw, "get", f"/admin/requests/{answered['id']}").json()
    completions = detail["completions"]
    assert len(completions) == 3 and sum(c["chosen"] for c in completions) == 1
    chosen = next(c for c in completions if c["chosen"])
    assert chosen["answer"] == answered["iapo"]["answer"] and chosen["votes"] == max(detail["votes"].values())


def test_the_config_view_redacts_secrets(gw, monkeypatch):
    config = call(gw, "get", "/admin/config").json()
    text = json.dumps(config)
    assert hash_key(ADMIN) not in text and hash_key(CALLER) not in text
    assert config["upstreams"]["replay-math"]["api_key_env"] == "IAPO_TEST_SECRET"  # the name, not the value
    from gateway.console import config_view
    from gateway.config import load_config

    cfg = load_config(gw.config_path, store={"url": "postgresql://iapo:hunter2@db.internal/iapo"})
    assert "hunter2" not in json.dumps(config_view(cfg))


def test_admin_paths_are_in_the_openapi_document(gw):
    paths = httpx.get(f"{gw.url}/openapi.json").json()["paths"]
    assert {"/admin/keys", "/admin/spend", "/admin/policies/rollback", "/admin/requests/{request_id}"} <= set(paths)
