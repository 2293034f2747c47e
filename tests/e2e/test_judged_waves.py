"""Best-of-N in waves with a paid judge on its own upstream: what the judges cost is booked, wave by wave,
even when one judge call fails while another is still running."""
from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.config import hash_key
from sandbox.servers import ServerThread
from tests.e2e.test_front_door import upstream_cfg

JUDGE_CALL = 0.101  # 100 prompt + 1 completion tokens at $1 per 1k each
STATE: dict = {}


async def judge(request):
    """A judge upstream: call k answers `score(k)` after `delay(k)` seconds, or fails with 400 (no usage,
    so not billed) when k is in `fail_on`."""
    STATE["calls"] += 1
    k = STATE["calls"]
    await asyncio.sleep(STATE["delay"](k))
    if k in STATE["fail_on"]:
        return JSONResponse({"error": {"message": "judge down", "type": "invalid_request_error"}}, status_code=400)
    return JSONResponse({"id": f"j{k}", "object": "chat.completion", "created": 0, "model": "judge",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": STATE["score"](k)},
                                      "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 100, "completion_tokens": 1, "total_tokens": 101}})


@pytest.fixture(scope="module")
def judge_server():
    server = ServerThread(Starlette(routes=[Route("/v1/chat/completions", judge, methods=["POST"])])).start()
    yield server
    server.stop()


@pytest.fixture
def gw(start_gateway, scripted, judge_server):
    STATE.update(calls=0, fail_on=set(), score=lambda k: "3", delay=lambda k: 0.0)
    return start_gateway({
        "upstreams": {"scripted": upstream_cfg(scripted.url),
                      "judge": {"model": "openai/judge", "api_base": f"{judge_server.url}/v1", "retries": 0,
                                "timeout": 5, "price": {"prompt_per_1k": 1.0, "completion_per_1k": 1.0}}},
        "routes": [{"model": "best", "upstream": "scripted", "aggregator": "bon", "n_max": 8,
                    "objectives": [{"name": "rated", "scorer": {"type": "judge", "upstream": "judge"},
                                    "low": 0, "high": 10}],
                    "prompts": [{"id": "p0", "params": {"max_tokens": 50}}],
                    "start": {"default": {"prompt": "p0", "n": 8}}}],
        "tiers": [{"name": "scored", "adaptive": {"threshold": 0.65, "first_wave": 2, "wave": 2},
                   "caps": {"per_day": {"dollars": 100.0}}}],
        "default_tier": "scored",
        "api_keys": [{"hash": hash_key("k"), "tier": "scored"}],
        "seed": 3,
    })


def ask(gw) -> dict:
    r = httpx.post(f"{gw.url}/v1/chat/completions", headers={"authorization": "Bearer k"},
                   json={"model": "best", "messages": [{"role": "user", "content": "q"}]}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def completion_cost(gw, request_id: str) -> float:
    return sum(c["cost"] for c in gw.rows("select cost from completions where request_id = ?", [request_id]))


def test_a_judged_wave_that_reaches_the_threshold_ends_the_request_and_every_judge_call_is_booked(gw):
    STATE["score"] = lambda k: "9" if k == 3 else "3"  # the first completion of wave 2 rates 9/10
    body = ask(gw)
    assert body["iapo"]["waves"] == 2 and body["iapo"]["completions"] == 4 and STATE["calls"] == 4
    assert body["iapo"]["scores"] == {"rated": pytest.approx(0.9)}
    spend = gw.spend("tier:scored")
    expected = completion_cost(gw, body["id"]) + 4 * JUDGE_CALL
    assert spend["dollars"] == pytest.approx(expected) == pytest.approx(body["iapo"]["cost"])
    assert spend["reserved"] == 0


def test_a_failing_judge_call_waits_for_the_paid_call_beside_it(gw):
    STATE["fail_on"] = {4}  # wave 2: call 4 fails at once while call 3 is still being rated
    STATE["delay"] = lambda k: 1.0 if k == 3 else 0.0
    body = ask(gw)
    assert "scoring_error" in body["iapo"] and body["iapo"]["waves"] == 2
    spend = gw.spend("tier:scored")
    # calls 1-3 answered with usage and were billed; the slow one must not be lost to the settle
    assert spend["dollars"] == pytest.approx(completion_cost(gw, body["id"]) + 3 * JUDGE_CALL)
    assert spend["reserved"] == 0
