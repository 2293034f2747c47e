"""End-to-end over loopback: openai client → gateway (uvicorn) → litellm → replay upstream (uvicorn)."""
from __future__ import annotations

import json

import httpx
import openai
import numpy as np
import pytest
import sqlite_utils
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import hash_key
from sandbox.demo import replay_route, replay_upstream
from sandbox.replay import problem_text
from policies.arms import Arm
from policies.environments import mv_vote_credit
from store.database import open_database
from store.policy_store import PolicyEntry, PolicyStore

KEYS = {"low": "key-low", "mid": "key-mid", "high": "key-high"}


def config(replay, math_env, synthetic_envs, **extra) -> dict:
    cfg = {
        "upstreams": {
            "replay-math": replay_upstream(replay.url, "replay-math"),
            "replay-bon": replay_upstream(replay.url, "replay-bon"),
            "replay-fanout": replay_upstream(replay.url, "replay-math", supports_n=False, retries=0),
        },
        "routes": [
            replay_route("math", "replay-math", math_env, base_url=replay.url, env_name="replay-math",
                         start={"default": {"prompt": "p4", "n": 9}}),
            replay_route("assist", "replay-bon", synthetic_envs["replay-bon"], base_url=replay.url,
                         env_name="replay-bon", start={"default": {"prompt": "p3", "n": 6}}),
            replay_route("math-fanout", "replay-fanout", math_env, base_url=replay.url, env_name="replay-math",
                         start={"default": {"prompt": "p4", "n": 6}}),
        ],
        "tiers": [
            {"name": "low", "weights": {"helpful": 0.8, "harmless": 0.2}, "cost_weight": 0.0, "max_n": 32},
            {"name": "mid", "weights": {"helpful": 0.5, "harmless": 0.5}, "cost_weight": 0.2, "max_n": 16},
            {"name": "high", "weights": {"helpful": 0.2, "harmless": 0.8}, "cost_weight": 1.0, "max_n": 4},
        ],
        "default_tier": "mid",
        "api_keys": [{"hash": hash_key(k), "tier": t} for t, k in KEYS.items()],
        "seed": 3,
    }
    cfg.update(extra)
    return cfg


@pytest.fixture
def gw(start_gateway, replay, math_env, synthetic_envs):
    return start_gateway(config(replay, math_env, synthetic_envs))


def metrics(url: str) -> dict:
    """{(name, frozenset(labels)): value} from a live /metrics, parsed with prometheus-client."""
    text = httpx.get(f"{url}/metrics").text
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(m: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in m.items() if n == name and set(labels.items()) <= ls)


def ask(query: int) -> list[dict]:
    return [{"role": "user", "content": problem_text(query)}]


def test_routed_mv_request_end_to_end(gw, math_env):
    before = metrics(gw.url)
    client = gw.client(KEYS["low"])
    raw = client.chat.completions.with_raw_response.create(model="math", messages=ask(11))
    resp = raw.parse()
    body = json.loads(raw.text)
    assert raw.headers["x-iapo-prompt"] == "p4" and raw.headers["x-iapo-n"] == "9"
    assert raw.headers["x-iapo-policy-version"] == "0"
    assert float(raw.headers["x-iapo-overhead-ms"]) >= 0
    iapo = body["iapo"]
    assert (iapo["route"], iapo["tier"], iapo["prompt_id"], iapo["n"], iapo["aggregator"]) == ("math", "low", "p4", 9, "mv")
    tokens = int(round(math_env.cost[4] * 1e5))
    assert resp.usage.completion_tokens == 9 * tokens
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert iapo["answer"] in resp.choices[0].message.content
    gw.gateway.writer.flush()
    db = sqlite_utils.Database(gw.db_path)
    row = db["requests"].get(resp.id)
    assert (row["route"], row["tier"], row["prompt_id"], row["n"], row["status"]) == ("math", "low", "p4", 9, 200)
    rows = list(db.query("select * from completions where request_id = ? order by idx", [resp.id]))
    assert len(rows) == 9 and sum(r["completion_tokens"] for r in rows) == 9 * tokens
    assert rows[row["chosen_index"]]["answer"] == iapo["answer"]
    votes = [r["answer"] for r in rows]
    assert votes.count(iapo["answer"]) == max(votes.count(a) for a in votes)
    after = metrics(gw.url)
    assert value(after, "iapo_requests_total", route="math", tier="low", status="200") - \
        value(before, "iapo_requests_total", route="math", tier="low", status="200") == 1
    assert value(after, "iapo_completions_total", route="math", tier="low") - \
        value(before, "iapo_completions_total", route="math", tier="low") == 9
    assert value(after, "iapo_tokens_total", route="math", tier="low", kind="completion") == 9 * tokens
    assert value(after, "iapo_cost_dollars_total", route="math", tier="low") == pytest.approx(9 * tokens * 1e-5)
    assert value(after, "iapo_request_duration_seconds_count", route="math", tier="low") == 1


def test_streaming_returns_the_chosen_completion_as_chunks(gw):
    client = gw.client(KEYS["mid"])
    stream = client.chat.completions.create(model="math", messages=ask(5), stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens > 0
    gw.gateway.writer.flush()
    db = sqlite_utils.Database(gw.db_path)
    row = db["requests"].get(chunks[0].id)
    chosen = db.execute("select text from completions where request_id = ? and idx = ?",
                        [row["id"], row["chosen_index"]]).fetchone()[0]
    assert text == chosen
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json={"model": "math", "messages": ask(5), "stream": True},
                      headers={"authorization": f"Bearer {KEYS['mid']}"}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    assert all(json.loads(l[6:])["object"] == "chat.completion.chunk" for l in lines[:-1])


def test_majority_vote_serves_the_replay_majority(gw, math_env):
    """Where the replay distribution makes one class win a 9-vote with ≥ 99.9%, that class is served."""
    credit = mv_vote_credit(math_env.answer_probs[4], math_env.gold, 9)[:, 8]
    probs = math_env.answer_probs[4]
    sure = [x for x in range(math_env.n_queries) if credit[x] > 0.999][:6]
    leader = probs.argmax(axis=1)
    leader_wins = mv_vote_credit(probs, leader, 9)[:, 8]  # the vote's chance to pick the likeliest class
    wrong_sure = [x for x in range(math_env.n_queries) if leader_wins[x] > 0.999 and leader[x] != math_env.gold[x]][:2]
    client = gw.client(KEYS["low"])
    for x in sure + wrong_sure:
        resp = client.chat.completions.create(model="math", messages=ask(x))
        assert resp.model_extra["iapo"]["answer"] == str(int(probs[x].argmax()))
    assert len(sure) >= 3


def test_best_of_n_returns_the_highest_weighted_score(gw, synthetic_envs):
    env = synthetic_envs["replay-bon"]
    weights = {"low": (0.8, 0.2), "high": (0.2, 0.8)}
    for tier, w in weights.items():
        client = gw.client(KEYS[tier])
        for q in range(4):
            resp = client.chat.completions.create(model="assist", messages=[{"role": "user", "content": f"Query {q}: help"}])
            gw.gateway.writer.flush()
            db = sqlite_utils.Database(gw.db_path)
            rows = list(db.query("select text, scores from completions where request_id = ? order by idx", [resp.id]))
            totals = [np.dot(w, json.loads(r["scores"])) for r in rows]
            chosen = resp.choices[0].message.content
            assert np.dot(w, [resp.model_extra["iapo"]["scores"][k] for k in env.objectives]) == pytest.approx(max(totals))
            assert chosen in [r["text"] for r in rows if np.dot(w, json.loads(r["scores"])) == pytest.approx(max(totals))]
    assert len(rows) == 4  # high tier: max_n 4 clamps the start arm's 6


def test_policy_switch_without_restart_and_max_n_clamp(gw):
    """A published policy gives λ=1 a smaller N than λ=0; the gateway picks it up live; max_n holds."""
    store = PolicyStore(open_database(gw.db_path))
    version = store.publish([
        PolicyEntry("math", "low", Arm("p4", 32)),
        PolicyEntry("math", "mid", Arm("p4", 11)),
        PolicyEntry("math", "high", Arm("p1", 32)),  # beyond the high tier's max_n = 4
    ], run_id="test")
    deadline = __import__("time").monotonic() + 5
    while gw.gateway.policy.version != version and __import__("time").monotonic() < deadline:
        __import__("time").sleep(0.05)
    served = {}
    for tier in ("low", "mid", "high"):
        raw = gw.client(KEYS[tier]).chat.completions.with_raw_response.create(model="math", messages=ask(3))
        served[tier] = (raw.headers["x-iapo-prompt"], int(raw.headers["x-iapo-n"]), raw.headers["x-iapo-policy-version"])
    assert served["low"] == ("p4", 32, str(version))
    assert served["mid"] == ("p4", 11, str(version))
    assert served["high"] == ("p1", 4, str(version))
    assert value(metrics(gw.url), "iapo_policy_version") == version


def test_cost_cap_limits_n(start_gateway, replay, math_env, synthetic_envs):
    cfg = config(replay, math_env, synthetic_envs)
    cfg["tiers"][0]["max_cost_per_request"] = 0.05  # worst case per completion: 1200 tokens × $0.01/1K = $0.012
    gw = start_gateway(cfg)
    raw = gw.client(KEYS["low"]).chat.completions.with_raw_response.create(model="math", messages=ask(1))
    assert raw.headers["x-iapo-n"] == "4"


def test_models_health_and_proxy(gw):
    models = httpx.get(f"{gw.url}/v1/models").json()
    ids = {m["id"] for m in models["data"]}
    assert {"math", "assist", "replay-math"} <= ids
    assert httpx.get(f"{gw.url}/healthz").json()["status"] == "ok"
    resp = gw.client(KEYS["low"]).chat.completions.create(model="replay-math", messages=ask(2), n=3)
    assert len(resp.choices) == 3 and not hasattr(resp, "iapo") or "iapo" not in (resp.model_extra or {})
    assert resp.usage.completion_tokens > 0


@pytest.mark.parametrize("body, status, code", [
    (b"{not json", 400, "invalid_json"),
    (b"[]", 400, "invalid_json"),
    (json.dumps({"model": "math"}).encode(), 400, "missing_required_parameter"),
    (json.dumps({"model": "math", "messages": []}).encode(), 400, "empty_array"),
    (json.dumps({"model": "math", "messages": "hi"}).encode(), 400, "invalid_type"),
    (json.dumps({"model": "math", "messages": [{"role": "user", "content": 5}]}).encode(), 400, "invalid_type"),
    (json.dumps({"model": "math", "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "invalid_value"),
    (json.dumps({"model": "math", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).encode(), 400, "invalid_type"),
    (json.dumps({"model": "math", "messages": [{"role": "user", "content": "x"}], "n": 4}).encode(), 400, "invalid_value"),
    (json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]}).encode(), 404, "model_not_found"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), 400, "missing_required_parameter"),
    (b"x" * 1_000_001, 413, "body_too_large"),
])
def test_bad_input_gets_openai_style_errors(gw, body, status, code):
    r = httpx.post(f"{gw.url}/v1/chat/completions", content=body,
                   headers={"authorization": f"Bearer {KEYS['low']}", "content-type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"]


def test_unknown_key_is_refused(gw):
    import openai

    with pytest.raises(openai.AuthenticationError) as exc:
        gw.client("not-a-key").chat.completions.create(model="math", messages=ask(1))
    assert exc.value.status_code == 401
    assert exc.value.body["code"] == "invalid_api_key"


def test_upstream_failures_partial_and_total(gw, replay, reset_faults):
    """Fan-out route: some of N fail → answer from the rest; all fail → 502; both recorded."""
    httpx.post(f"{replay.url}/admin/faults", json={"error_rate": 0.5, "error_status": 500})
    client = gw.client(KEYS["low"])
    partial = None
    for q in range(20):
        try:
            resp = client.chat.completions.create(model="math-fanout", messages=ask(q))
        except openai.InternalServerError:  # all six failed (1 in 64): not the case under test
            continue
        if resp.model_extra["iapo"]["failed"] > 0:
            partial = resp
            break
    assert partial is not None
    httpx.post(f"{replay.url}/admin/faults", json={"error_rate": 1.0, "error_status": 500})
    r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "math", "messages": ask(1)},
                   headers={"authorization": f"Bearer {KEYS['low']}"})
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_failed"
    gw.gateway.writer.flush()
    db = sqlite_utils.Database(gw.db_path)
    row = db["requests"].get(partial.id)
    n_failed = db.execute("select count(*) from completions where request_id = ? and error is not null",
                          [partial.id]).fetchone()[0]
    assert row["failed"] == n_failed == partial.model_extra["iapo"]["failed"]
    assert db.execute("select count(*) from requests where status = 502 and route = 'math'").fetchone()[0] == 1
    m = metrics(gw.url)
    assert value(m, "iapo_upstream_errors_total", kind="server") > 0


def test_upstream_timeout_gives_502(start_gateway, replay, math_env, synthetic_envs, reset_faults):
    cfg = config(replay, math_env, synthetic_envs)
    cfg["upstreams"]["replay-math"]["timeout"] = 0.3
    gw = start_gateway(cfg)
    httpx.post(f"{replay.url}/admin/faults", json={"latency_ms": 1000})
    r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "math", "messages": ask(1)}, timeout=10)
    assert r.status_code == 502
    assert "timeout" in r.json()["error"]["message"]


def test_feedback_attaches_gold_and_counts_accuracy(gw, math_env):
    client = gw.client(KEYS["low"])
    resp = client.chat.completions.create(model="math", messages=ask(20))
    gold = str(int(math_env.gold[20]))
    r = httpx.post(f"{gw.url}/v1/feedback", json={"id": resp.id, "gold": gold},
                   headers={"authorization": f"Bearer {KEYS['low']}"})
    assert r.status_code == 200, r.text
    assert r.json()["correct"] == (resp.model_extra["iapo"]["answer"] == gold)
    other = httpx.post(f"{gw.url}/v1/feedback", json={"id": resp.id, "gold": gold},
                       headers={"authorization": f"Bearer {KEYS['high']}"})
    assert other.status_code == 404  # another tier's caller cannot touch this response
    missing = httpx.post(f"{gw.url}/v1/feedback", json={"id": "chatcmpl-nope", "gold": "1"},
                         headers={"authorization": f"Bearer {KEYS['low']}"})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "id"
    gw.gateway.writer.flush()
    db = sqlite_utils.Database(gw.db_path)
    assert db.execute("select gold from feedback where request_id = ?", [resp.id]).fetchone()[0] == gold
    assert value(metrics(gw.url), "iapo_feedback_correct_total", route="math") == 1


def test_openai_transport_serves_the_same_contract(start_gateway, replay, math_env, synthetic_envs, reset_faults):
    """`transport: openai` (no litellm on the hot path): same answer contract, usage, cost and errors."""
    cfg = config(replay, math_env, synthetic_envs)
    cfg["upstreams"]["replay-math"]["transport"] = "openai"
    gw = start_gateway(cfg)
    raw = gw.client(KEYS["low"]).chat.completions.with_raw_response.create(model="math", messages=ask(11))
    resp = raw.parse()
    tokens = int(round(math_env.cost[4] * 1e5))
    assert raw.headers["x-iapo-n"] == "9" and resp.usage.completion_tokens == 9 * tokens
    assert resp.model_extra["iapo"]["cost"] == pytest.approx(9 * tokens * 1e-5)
    httpx.post(f"{replay.url}/admin/faults", json={"error_rate": 1.0, "error_status": 429, "retry_after": 0.01})
    r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "math", "messages": ask(1)})
    assert r.status_code == 502 and "rate_limit" in r.json()["error"]["message"]


@pytest.mark.parametrize("transport", ["litellm", "openai"])
def test_dropped_and_slow_upstream_responses_are_retried(start_gateway, replay, math_env, synthetic_envs,
                                                        reset_faults, transport):
    cfg = config(replay, math_env, synthetic_envs)
    cfg["upstreams"]["replay-math"].update(transport=transport, retries=7, timeout=10)
    gw = start_gateway(cfg)
    # a quarter of calls dropped: one call losing all 8 attempts has probability 1.5e-5, and 30 calls
    # without any drop 1.8e-4
    httpx.post(f"{replay.url}/admin/faults", json={"drop_rate": 0.25, "slow_rate": 0.1, "slow_ms": 200})
    client = gw.client(KEYS["low"])
    for q in range(30):
        resp = client.chat.completions.create(model="math", messages=ask(q))
        assert resp.model_extra["iapo"]["failed"] == 0
    m = metrics(gw.url)
    assert value(m, "iapo_upstream_errors_total", upstream="replay-math") > 0  # drops happened and were retried
    httpx.post(f"{replay.url}/admin/faults", json={"drop_rate": 0.0, "slow_rate": 1.0, "slow_ms": 15000})
    r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "math", "messages": ask(1)}, timeout=30)
    assert r.status_code == 502 and "timeout" in r.json()["error"]["message"]  # too slow: a clear error


def test_fallback_upstream_serves_when_the_primary_is_down(start_gateway, replay, math_env, synthetic_envs):
    cfg = config(replay, math_env, synthetic_envs)
    dead = replay_upstream("http://127.0.0.1:9", "replay-math", retries=1, fallback="replay-math")
    cfg["upstreams"]["primary"] = dead
    cfg["routes"][0]["upstream"] = "primary"
    gw = start_gateway(cfg)
    resp = gw.client(KEYS["low"]).chat.completions.create(model="math", messages=ask(4))
    assert resp.model_extra["iapo"]["failed"] == 0 and resp.usage.completion_tokens > 0
    assert value(metrics(gw.url), "iapo_upstream_errors_total", upstream="primary", kind="connection") >= 1
