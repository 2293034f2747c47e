"""Hostile input: property tests on the aggregators, and a schemathesis fuzz run against the gateway's own OpenAPI document: always a 4xx with an OpenAI-style body, never a 5xx."""
from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from gateway.config import Limits, hash_key
from sandbox.demo import replay_route, replay_upstream
from policies.aggregate import best_of_n, majority_vote
from policies.utility import answers_to_counts, mv_credit

@settings(max_examples=300, deadline=None)
@given(answers=st.lists(st.one_of(st.none(), st.sampled_from("abcde")), min_size=1, max_size=20), seed=st.integers(0, 99))
def test_majority_vote_properties(answers, seed):
    vote = majority_vote(answers, np.random.default_rng(seed))
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        assert vote.answer is None and vote.tie_size == 0
        return
    top = max(counts.values())
    assert counts[vote.answer] == top and answers[vote.index] == vote.answer
    assert vote.tie_size == sum(1 for c in counts.values() if c == top)
    assert vote.vote_share == pytest.approx(top / len(answers))
    for gold in "abcdef":
        credit = float(mv_credit(answers_to_counts(answers, gold)))
        assert credit == pytest.approx(1 / vote.tie_size if counts.get(gold) == top else 0.0)


@settings(max_examples=200, deadline=None)
@given(scores=st.lists(st.lists(st.floats(0, 1), min_size=2, max_size=2), min_size=1, max_size=12),
       w=st.floats(0, 1), seed=st.integers(0, 9))
def test_best_of_n_picks_a_maximum(scores, w, seed):
    s = np.array(scores)
    weights = np.array([w, 1 - w])
    i = best_of_n(s, weights, np.random.default_rng(seed))
    assert s[i] @ weights >= (s @ weights).max() - 1e-9


def test_prompt_templates_do_not_evaluate_user_text(start_gateway, replay, math_env):
    cfg = {"upstreams": {"u": replay_upstream(replay.url, "replay-math")},
           "routes": [{**replay_route("math", "u", math_env, base_url=replay.url, env_name="replay-math"),
                       "prompts": [{"id": "p0", "system": "Prompt 0: {secret}", "instruction": "Answer {0} in ${x}"}]}]}
    gw = start_gateway(cfg)
    hostile = "Problem 1: {__class__.__mro__} {0} %s ${HOME} {{7*7}}"
    r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "math", "messages": [{"role": "user", "content": hostile}]})
    assert r.status_code == 200
    gw.gateway.writer.flush()
    from store.database import open_database

    stored = open_database(gw.db_path).execute("select messages from requests").fetchone()[0]
    assert hostile in json.loads(stored)[0]["content"]  # stored exactly as sent, nothing interpolated


def test_limits_on_messages_max_tokens_and_headers(start_gateway, replay, math_env):
    cfg = {"upstreams": {"u": replay_upstream(replay.url, "replay-math")},
           "routes": [replay_route("math", "u", math_env, base_url=replay.url, env_name="replay-math")],
           "limits": {"max_messages": 3, "max_tokens": 500}}
    gw = start_gateway(cfg)
    msgs = [{"role": "user", "content": "x"}] * 4
    r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "math", "messages": msgs})
    assert r.status_code == 400 and r.json()["error"]["code"] == "array_above_max_length"
    r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "math", "messages": msgs[:1], "max_tokens": 501})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    try:
        r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "math", "messages": msgs[:1]},
                       headers={"x-huge": "a" * 200_000})
        assert r.status_code in (400, 431)  # refused by the HTTP server's header limit
    except httpx.HTTPError:
        pass  # or the connection is closed: either way nothing is served


def test_keys_never_reach_logs_store_or_metrics(tmp_path, replay, math_env):
    """A subprocess gateway with request logging on: grep its log, the SQLite file and /metrics."""
    import yaml

    from conftest import serve_process
    from sandbox.servers import free_port

    key = "sk-very-secret-key-0123456789"
    cfg = {"upstreams": {"u": {**replay_upstream(replay.url, "replay-math"), "api_key_env": "IAPO_TEST_UPSTREAM_KEY"}},
           "routes": [replay_route("math", "u", math_env, base_url=replay.url, env_name="replay-math")],
           "tiers": [{"name": "t", "caps": {"per_day": {"dollars": 100}}, "key_caps": {"per_day": {"dollars": 50}}}],
           "api_keys": [{"hash": hash_key(key), "tier": "t"}], "store": {"path": str(tmp_path / "iapo.db")}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    upstream_secret = "upstream-secret-abcdef"
    log = open(tmp_path / "gateway.log", "w")
    proc = serve_process(str(tmp_path / "c.yaml"), port, "--log-level", "debug",
                         env={"IAPO_TEST_UPSTREAM_KEY": upstream_secret}, stdout=log)
    url = f"http://127.0.0.1:{port}"
    try:
        for i in range(5):
            r = httpx.post(f"{url}/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                           json={"model": "math", "messages": [{"role": "user", "content": f"Problem {i}: x"}]})
            assert r.status_code == 200
        httpx.post(f"{url}/v1/chat/completions", headers={"authorization": "Bearer sk-wrong-key-987"},
                   json={"model": "math", "messages": [{"role": "user", "content": "x"}]})
        metrics = httpx.get(f"{url}/metrics").text
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("iapo.db*"))
    logged = (tmp_path / "gateway.log").read_text()
    for secret in (key, "sk-wrong-key-987", upstream_secret, f"Bearer {key}"):
        assert secret not in logged and secret not in metrics and secret.encode() not in stored, secret


def test_schemathesis_fuzz_finds_no_server_error(start_gateway, replay, math_env, synthetic_envs):
    exe = shutil.which("schemathesis") or shutil.which("st")
    if exe is None:
        pytest.fail("schemathesis is a test dependency (pip install -e '.[test]')")
    cfg = {"upstreams": {"replay-math": replay_upstream(replay.url, "replay-math")},
           "routes": [replay_route("math", "replay-math", math_env, base_url=replay.url, env_name="replay-math",
                                   start={"default": {"prompt": "p4", "n": 2}})]}
    gw = start_gateway(cfg)
    out = subprocess.run([exe, "run", f"{gw.url}/openapi.json", "--checks", "not_a_server_error",
                          "--max-examples", "60", "--request-timeout", "10", "--seed", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
