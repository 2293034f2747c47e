"""What a cap reserves must bound what a request can be billed for, whatever the caller sends and
whatever the provider answers; findings of the adversarial review of the front door, one test each."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from gateway.config import ConfigError, hash_key, load_config
from sandbox.scripted import create_scripted_app
from sandbox.servers import ServerThread
from tests.support import metric_value, metrics_snapshot, wait_for

KEY = "k-capped"
ASK = [{"role": "user", "content": "Say something."}]
PRICE = {"prompt_per_1k": 0.01, "completion_per_1k": 0.02}


def upstream(url: str, **extra) -> dict:
    return {"model": "openai/scripted", "api_base": f"{url}/v1", "retries": 0, "timeout": 10, "price": PRICE, **extra}


def capped(url: str, dollars: float = 1.0, **extra) -> dict:
    cfg = {"upstreams": {"up": upstream(url)}, "tiers": [{"name": "capped", "caps": {"per_day": {"dollars": dollars}}}],
           "api_keys": [{"hash": hash_key(KEY), "tier": "capped"}]}
    cfg.update(extra)
    return cfg


def post(gw, body: dict, path: str = "/v1/chat/completions") -> httpx.Response:
    return httpx.post(f"{gw.url}{path}", json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=30)


def test_a_body_cannot_redirect_a_litellm_upstream_or_its_key(start_gateway, scripted):
    """api_base/base_url/api_key/mock_response in a body are the caller's fields, never litellm's settings."""
    evil = create_scripted_app()
    evil_server = ServerThread(evil).start()
    try:
        cfg = capped(scripted.url, upstreams={"up": upstream(scripted.url, transport="litellm",
                                                             api_key_env="IAPO_TEST_UPSTREAM_KEY")})
        gw = start_gateway(cfg)
        for field, value in (("api_base", f"{evil_server.url}/v1"), ("base_url", f"{evil_server.url}/v1"),
                             ("mock_response", "mocked!"), ("api_key", "sk-caller")):
            r = post(gw, {"model": "up", "messages": ASK, "max_tokens": 20, field: value})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] != "mocked!"
        assert evil.state.scripted.records == []
        assert len(scripted.records) == 4
    finally:
        evil_server.stop()


def test_a_bounded_tier_sends_a_token_limit_and_reserves_for_the_larger_one(start_gateway, scripted):
    gw = start_gateway(capped(scripted.url))
    r = post(gw, {"model": "up", "messages": ASK})
    assert r.status_code == 200 and r.headers["x-iapo-limited"] == "max_completion_tokens=4096"
    assert scripted.records[-1]["body"]["max_completion_tokens"] == 4096
    # both limits sent: a provider may honour either, so the larger one is what is reserved (and capped)
    tight = start_gateway(capped(scripted.url, dollars=0.05), name="tight")
    r = post(tight, {"model": "up", "messages": ASK, "max_tokens": 1, "max_completion_tokens": 30_000})
    assert r.status_code == 429  # 30,000 × $0.02/1K = $0.60 cannot fit a $0.05 cap
    r = post(tight, {"model": "up", "messages": ASK, "max_tokens": 1, "max_completion_tokens": 100})
    assert r.status_code == 200


def test_legacy_completions_reserve_every_prompt_and_best_of(start_gateway, scripted):
    cfg = capped(scripted.url, dollars=0.05)
    cfg["tiers"][0]["max_n"] = 16
    gw = start_gateway(cfg)
    r = post(gw, {"model": "up", "prompt": ["hi"] * 500, "max_tokens": 16}, "/v1/completions")
    assert r.status_code == 400 and r.json()["error"]["code"] == "n_above_tier_limit"
    r = post(gw, {"model": "up", "prompt": ["hi"] * 4, "best_of": 4, "max_tokens": 400}, "/v1/completions")
    assert r.status_code == 429  # 16 completions allowed by max_n, but 16 × 400 × $0.02/1K > the $0.05 cap
    assert post(gw, {"model": "up", "prompt": ["hi"] * 4, "max_tokens": 16}, "/v1/completions").status_code == 200
    assert scripted.records and all(len(rec["body"]["prompt"]) == 4 for rec in scripted.records)


def test_big_tools_count_toward_a_routes_prompt_bound(start_gateway, scripted):
    route = {"model": "r", "upstream": "up", "aggregator": "mv", "prompts": [{"id": "p", "params": {"max_tokens": 10}}],
             "start": {"default": {"prompt": "p", "n": 1}}}
    gw = start_gateway(capped(scripted.url, dollars=0.05, routes=[route]))
    tools = [{"type": "function", "function": {"name": f"f{i}", "description": "x" * 2000,
                                               "parameters": {"type": "object"}}} for i in range(100)]
    r = post(gw, {"model": "r", "messages": ASK, "tools": tools})  # ~200 KB of tools: ≥ $2 of prompt at worst
    assert r.status_code == 429 and not scripted.records


@pytest.mark.parametrize("stream", [False, True])
def test_answers_without_usage_are_booked_at_their_worst_case(start_gateway, scripted, stream):
    scripted.script.update({"omit_usage": True})
    gw = start_gateway(capped(scripted.url))
    r = post(gw, {"model": "up", "messages": ASK, "max_tokens": 100, "stream": stream})
    assert r.status_code == 200
    spent = gw.spend("tier:capped")
    assert spent["dollars"] >= 100 * 0.02 / 1000 and spent["reserved"] == 0


def test_a_timeout_after_sending_is_booked_at_its_worst_case(start_gateway, scripted):
    scripted.script.update({"latency": 3.0})
    cfg = capped(scripted.url, upstreams={"up": upstream(scripted.url, timeout=1)})
    gw = start_gateway(cfg)
    r = post(gw, {"model": "up", "messages": ASK, "max_tokens": 100})
    assert r.status_code == 502
    spent = gw.spend("tier:capped")
    assert spent["dollars"] >= 100 * 0.02 / 1000 and spent["reserved"] == 0


def test_a_fallback_is_priced_at_its_own_price(start_gateway, scripted):
    dear = {"prompt_per_1k": 1.0, "completion_per_1k": 1.0}
    cfg = capped(scripted.url, dollars=100.0, upstreams={
        "up": {**upstream("http://127.0.0.1:9"), "fallback": "dear"},  # nothing listens on port 9
        "dear": upstream(scripted.url, price=dear)})
    gw = start_gateway(cfg)
    scripted.script.update({"completion_tokens": 50, "prompt_tokens": 10})
    r = post(gw, {"model": "up", "messages": ASK, "max_tokens": 100})
    assert r.status_code == 200
    assert gw.spend("tier:capped")["dollars"] == pytest.approx(60 * 1.0 / 1000)


def test_judge_calls_are_reserved_and_booked(start_gateway, scripted, replay):
    route = {"model": "graded", "upstream": "up", "aggregator": "bon", "n_max": 4,
             "prompts": [{"id": "p", "params": {"max_tokens": 50}}], "start": {"default": {"prompt": "p", "n": 4}},
             "objectives": [{"name": "g", "scorer": {"type": "judge", "upstream": "judge"}, "low": 0, "high": 10}]}
    judge = {"model": "openai/judge", "api_base": f"{replay.url}/v1", "price": {"prompt_per_1k": 1.0,
                                                                              "completion_per_1k": 1.0}}
    cfg = capped(scripted.url, dollars=100.0, routes=[route], upstreams={"up": upstream(scripted.url), "judge": judge})
    gw = start_gateway(cfg)
    r = post(gw, {"model": "graded", "messages": ASK})
    assert r.status_code == 200
    judged = 4 * 11 / 1000  # the replay judge reports 10 prompt + 1 completion tokens per call, at $1/1K
    assert r.json()["iapo"]["cost"] > judged
    assert gw.spend("tier:capped")["dollars"] == pytest.approx(r.json()["iapo"]["cost"])
    row = gw.row(r.json()["id"])
    assert row["cost"] == pytest.approx(r.json()["iapo"]["cost"])


def test_fallback_cycles_are_refused_by_the_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"upstreams": {"a": {"model": "openai/x", "api_base": "http://h", "fallback": "b"},
                                              "b": {"model": "openai/y", "api_base": "http://h", "fallback": "a"}}}))
    with pytest.raises(ConfigError, match="cycle"):
        load_config(path)


def test_a_malformed_upstream_body_is_a_502_and_releases_its_reservation(start_gateway):
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    async def chat(request):
        return Response(b"[1, 2, 3]", media_type="application/json")

    broken = ServerThread(Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])).start()
    try:
        gw = start_gateway(capped(broken.url))
        r = post(gw, {"model": "up", "messages": ASK, "max_tokens": 10})
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_failed"
        assert gw.spend("tier:capped")["reserved"] == 0
    finally:
        broken.stop()


def test_waiting_for_a_slot_does_not_eat_the_calls_deadline(start_gateway, scripted):
    scripted.script.update({"latency": 0.6})
    cfg = capped(scripted.url, upstreams={"up": upstream(scripted.url, timeout=1.0, max_concurrency=1)})
    gw = start_gateway(cfg)

    async def run():
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(client.post(f"{gw.url}/v1/chat/completions",
                                                      headers={"authorization": f"Bearer {KEY}"},
                                                      json={"model": "up", "messages": ASK, "max_tokens": 5})
                                          for _ in range(3)))

    statuses = sorted(r.status_code for r in asyncio.run(run()))
    # one slot, 0.6 s per call, 1 s to get a slot: two are served; the third waited too long for a
    # slot and is refused by the gateway (503) without reaching the upstream with a cut-short timeout
    assert statuses[:2] == [200, 200] and statuses[2] in (200, 503)
    assert scripted.stats["requests"] == statuses.count(200)


def test_a_reload_does_not_break_requests_in_flight(start_gateway, scripted):
    scripted.script.update({"latency": 2.0})
    gw = start_gateway(capped(scripted.url))
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=post(gw, {"model": "up", "messages": ASK,
                                                                      "max_tokens": 5})))
    thread.start()
    wait_for(lambda: scripted.stats["in_flight"] == 1)
    cfg = capped(scripted.url, upstreams={"up": upstream(scripted.url, timeout=9)})  # a changed upstream
    cfg["store"] = {"path": gw.db_path, "policy_poll_seconds": 0.1}
    gw.config_path.write_text(json.dumps(cfg))
    assert asyncio.run_coroutine_threadsafe(gw.gateway.reload(), gw.gateway.loop).result(30)
    for _ in range(60):  # the housekeeping that closes replaced runtimes must wait for this request
        asyncio.run_coroutine_threadsafe(gw.gateway._close_retired(), gw.gateway.loop).result(5)
        if not thread.is_alive():
            break
        time.sleep(0.05)
    thread.join(10)
    assert result["r"].status_code == 200


def test_a_client_that_does_not_read_is_cut_off_not_buffered(start_gateway, scripted):
    from gateway.streams import Relay

    async def run():
        relay = Relay(keepalive_s=10)
        for i in range(Relay.MAX_QUEUED + 10):
            relay.put(b"data: x\n\n")
        return relay.client_gone, relay.queue.qsize()

    gone, queued = asyncio.run(run())
    assert gone and queued == 1  # only the end marker is left


def test_routed_streams_whose_client_left_are_counted_499(start_gateway, scripted):
    route = {"model": "r", "upstream": "up", "aggregator": "mv", "prompts": [{"id": "p", "params": {"max_tokens": 10}}],
             "start": {"default": {"prompt": "p", "n": 3}}}
    gw = start_gateway(capped(scripted.url, routes=[route], limits={"stream_keepalive_seconds": 0.1}))
    scripted.script.update({"latency": 1.0})
    before = metrics_snapshot(gw.url)
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                      json={"model": "r", "messages": ASK, "stream": True}) as r:
        request_id = r.headers["x-iapo-request-id"]
        next(r.iter_lines())  # a keep-alive, then leave
    row = wait_for(lambda: gw.row(request_id), timeout=10)
    assert row["status"] == 499 and row["cost"] > 0
    after = metrics_snapshot(gw.url)
    assert metric_value(after, "iapo_requests_total", status="499") - \
        metric_value(before, "iapo_requests_total", status="499") == 1


@pytest.mark.parametrize("path", ["/completions", "/embeddings", "/responses", "/models"])
def test_every_endpoint_answers_without_the_v1_prefix_too(start_gateway, scripted, path):
    gw = start_gateway(capped(scripted.url))
    bodies = {"/completions": {"model": "up", "prompt": "hi", "max_tokens": 5},
              "/embeddings": {"model": "up", "input": "hi"}, "/responses": {"model": "up", "input": "hi",
                                                                           "max_output_tokens": 5}}
    headers = {"authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{gw.url}{path}", json=bodies[path], headers=headers) if path in bodies else \
        httpx.get(f"{gw.url}{path}", headers=headers)
    assert r.status_code == 200, r.text
