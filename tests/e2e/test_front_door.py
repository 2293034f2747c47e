"""The front door as an existing app sees it: the official `openai` client (and litellm's SDK) against the
gateway over loopback, in front of a scripted upstream that streams, calls tools and records every body."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from gateway.config import hash_key
from tests.support import metric_value, metrics_snapshot, wait_for

KEY, KEY_CAPPED, KEY_NARROW = "key-open", "key-capped", "key-narrow"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
PARIS = {"name": "get_weather", "arguments": {"city": "Paris"}}
PARIS_SPACED = {"name": "get_weather", "arguments": '{ "city" :  "Paris" }'}
LONDON = {"name": "get_weather", "arguments": {"city": "London"}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def upstream_cfg(url: str, **extra) -> dict:
    return {"model": "openai/scripted", "api_base": f"{url}/v1", "retries": 0, "timeout": 20,
            "price": {"prompt_per_1k": 0.01, "completion_per_1k": 0.02}, **extra}


def route(model: str, aggregator: str, n: int, **extra) -> dict:
    cfg = {"model": model, "upstream": "scripted", "aggregator": aggregator, "n_max": 8,
           "prompts": [{"id": "p0", "system": "You are careful.", "params": {"temperature": 0.7, "max_tokens": 300}}],
           "start": {"default": {"prompt": "p0", "n": n}}, **extra}
    if aggregator == "bon":
        cfg["objectives"] = [{"name": "valid", "scorer": {"type": "json"}}]
    return cfg


def front_config(url: str, **extra) -> dict:
    cfg = {
        "upstreams": {"scripted": upstream_cfg(url), "scripted-litellm": upstream_cfg(url, transport="litellm")},
        "routes": [route("vote", "mv", 5), route("best", "bon", 4), route("single", "mv", 1)],
        "tiers": [{"name": "open"},
                  {"name": "capped", "max_n": 4, "caps": {"per_day": {"dollars": 0.05}}},
                  {"name": "narrow", "models": ["single", "vote"]}],
        "default_tier": "open",
        "api_keys": [{"hash": hash_key(KEY), "tier": "open"}, {"hash": hash_key(KEY_CAPPED), "tier": "capped"},
                     {"hash": hash_key(KEY_NARROW), "tier": "narrow"}],
        "limits": {"stream_keepalive_seconds": 0.2},
        "seed": 1,
    }
    cfg.update(extra)
    return cfg


@pytest.fixture
def gw(start_gateway, scripted):
    return start_gateway(front_config(scripted.url))


def stream_message(stream) -> tuple[str, dict, str | None, list]:
    """Accumulate an openai chat stream: content, tool calls by index, finish reason, chunks."""
    content, calls, finish, chunks = "", {}, None, []
    for chunk in stream:
        chunks.append(chunk)
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for call in delta.tool_calls or []:
                slot = calls.setdefault(call.index, {"name": "", "arguments": ""})
                slot["name"] += (call.function.name or "") if call.function else ""
                slot["arguments"] += (call.function.arguments or "") if call.function else ""
            finish = choice.finish_reason or finish
    return content, calls, finish, chunks


# -- tool calls -----------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["scripted", "scripted-litellm", "vote", "best"])
def test_tool_calls_round_trip_with_the_openai_client(gw, scripted, model):
    scripted.script.update({"tool_calls": [PARIS]})
    client = gw.client(KEY)
    r = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS)
    call = r.choices[0].message.tool_calls[0]
    assert (call.type, call.function.name, json.loads(call.function.arguments)) == ("function", "get_weather",
                                                                                    {"city": "Paris"})
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    assert scripted.records[-1]["body"]["tools"] == TOOLS
    _, calls, finish, _ = stream_message(client.chat.completions.create(model=model, messages=ASK, tools=TOOLS,
                                                                        stream=True))
    assert finish == "tool_calls"
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == {"city": "Paris"}


@pytest.mark.parametrize("model", ["scripted", "vote", "best"])
def test_tool_calls_round_trip_with_the_async_client(gw, scripted, model):
    scripted.script.update({"tool_calls": [PARIS]})

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=KEY, max_retries=0)
        r = await client.chat.completions.create(model=model, messages=ASK, tools=TOOLS)
        names = [r.choices[0].message.tool_calls[0].function.name]
        stream = await client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, stream=True)
        async for chunk in stream:
            for choice in chunk.choices:
                names += [c.function.name for c in choice.delta.tool_calls or [] if c.function and c.function.name]
        await client.close()
        return names

    assert asyncio.run(run()) == ["get_weather", "get_weather"]


def test_tool_calls_through_the_litellm_sdk(gw, scripted):
    import litellm

    scripted.script.update({"tool_calls": [PARIS]})
    for model in ("scripted", "vote"):
        r = litellm.completion(model=f"openai/{model}", api_base=f"{gw.url}/v1", api_key=KEY, messages=ASK,
                               tools=TOOLS)
        call = r.choices[0].message.tool_calls[0]
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}


def test_majority_vote_over_tool_calls_counts_equal_calls_as_one_answer(gw, scripted):
    # choices cycle Paris, Paris (other spacing), London, Paris, Paris: four votes for Paris
    scripted.script.update({"tool_calls_per_choice": [[PARIS], [PARIS_SPACED], [LONDON]]})
    r = gw.client(KEY).chat.completions.with_raw_response.create(model="vote", messages=ASK, tools=TOOLS)
    body = json.loads(r.text)
    assert json.loads(body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert json.loads(body["iapo"]["answer"]) == [["get_weather", {"city": "Paris"}]]
    assert body["iapo"]["vote_share"] == pytest.approx(0.8)
    assert scripted.records[-1]["body"]["n"] == 5


def test_best_of_n_scores_tool_calls(gw, scripted):
    bad = {"name": "get_weather", "arguments": "{city: Paris"}  # not JSON: the json objective scores it 0
    scripted.script.update({"tool_calls_per_choice": [[bad], [bad], [bad], [PARIS]]})
    r = gw.client(KEY).chat.completions.with_raw_response.create(model="best", messages=ASK, tools=TOOLS)
    body = json.loads(r.text)
    assert json.loads(body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert body["iapo"]["scores"] == {"valid": 1.0}


# -- the whole message, logprobs, refusals, provider details --------------------------------------
@pytest.mark.parametrize("model", ["scripted", "vote"])
def test_logprobs_refusal_fingerprint_and_usage_details_reach_the_client(gw, scripted, model):
    scripted.script.update({"content": "Final answer: 42", "cached_tokens": 3, "reasoning_tokens": 2,
                            "system_fingerprint": "fp_test"})
    client = gw.client(KEY)
    r = client.chat.completions.create(model=model, messages=ASK, logprobs=True, top_logprobs=2)
    assert r.system_fingerprint == "fp_test"
    assert [t.token for t in r.choices[0].logprobs.content] and len(r.choices[0].logprobs.content[0].top_logprobs) == 2
    assert r.usage.prompt_tokens_details.cached_tokens >= 3 and r.usage.completion_tokens_details.reasoning_tokens >= 2
    scripted.script.update({"refusal": "I can't help with that."}, reset=True)
    r = client.chat.completions.create(model=model, messages=ASK)
    assert r.choices[0].message.refusal == "I can't help with that." and r.choices[0].message.content is None


# -- fidelity: every request field ----------------------------------------------------------------
SAMPLES = {
    "audio": {"voice": "alloy", "format": "wav"}, "frequency_penalty": 0.5, "function_call": "auto",
    "functions": [{"name": "f", "parameters": {"type": "object"}}], "logit_bias": {"50256": -100},
    "logprobs": True, "max_completion_tokens": 50, "max_tokens": 50, "metadata": {"team": "a"},
    "modalities": ["text"], "parallel_tool_calls": False, "prediction": {"type": "content", "content": "x"},
    "presence_penalty": -0.5, "prompt_cache_key": "k1", "reasoning_effort": "low",
    "response_format": {"type": "json_object"}, "safety_identifier": "u-1", "seed": 7, "service_tier": "auto",
    "stop": ["\n\n"], "store": False, "temperature": 0.0, "tool_choice": "auto", "tools": TOOLS, "top_logprobs": 3,
    "top_p": 0.9, "user": "u-1", "verbosity": "low", "web_search_options": {"search_context_size": "low"},
}
GATEWAY_OWNED = {"model", "messages", "n", "stream", "stream_options"}


def chat_fields() -> list[str]:
    from openai.types.chat.completion_create_params import CompletionCreateParamsBase

    return sorted(set(CompletionCreateParamsBase.__annotations__) - GATEWAY_OWNED)


@pytest.mark.parametrize("field", chat_fields())
def test_every_chat_field_reaches_the_upstream(gw, scripted, field):
    """Passthrough: unchanged. Route: unchanged, except the arm's decoding settings (README: "Caller
    fields on a route"), which win and are named in x-iapo-overridden."""
    value = SAMPLES.get(field, {"probe": field})
    for model in ("scripted", "single"):
        body = {"model": model, "messages": ASK, field: value}
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"})
        assert r.status_code == 200, r.text
        sent = scripted.records[-1]["body"]
        arm = {"temperature": 0.7, "max_tokens": 300}
        if model == "single" and field == "temperature":
            assert sent["temperature"] == 0.7 and r.headers["x-iapo-overridden"] == "temperature"
        elif model == "single" and field in ("max_tokens", "max_completion_tokens"):
            assert sent[field] == min(value, arm["max_tokens"]) and "x-iapo-overridden" not in r.headers
        else:
            assert sent[field] == value
            assert "x-iapo-overridden" not in r.headers
        if model == "scripted":
            assert sent["model"] == "scripted" and sent["messages"] == ASK
        else:
            assert sent["messages"][0] == {"role": "system", "content": "You are careful."}


def test_route_caller_overrides_and_owned_fields(start_gateway, scripted):
    cfg = front_config(scripted.url)
    cfg["routes"][2]["caller_overrides"] = ["temperature"]
    gw = start_gateway(cfg)
    r = httpx.post(f"{gw.url}/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                   json={"model": "single", "messages": ASK, "temperature": 0, "max_tokens": 1000})
    sent = scripted.records[-1]["body"]
    assert sent["temperature"] == 0 and sent["max_tokens"] == 300 and r.headers["x-iapo-overridden"] == "max_tokens"
    r = httpx.post(f"{gw.url}/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                   json={"model": "vote", "messages": ASK, "n": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


# -- streaming ------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["scripted", "scripted-litellm", "single"])
def test_streams_arrive_as_the_upstream_sends_them(gw, scripted, model):
    scripted.script.update({"content": " ".join(f"w{i}" for i in range(10)), "chunk_count": 10, "chunk_delay": 0.2})
    start = time.monotonic()
    seen = []
    stream = gw.client(KEY).chat.completions.create(model=model, messages=ASK, stream=True,
                                                    stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            seen.append(time.monotonic() - start)
        usage = chunk.usage
    assert len(seen) >= 5
    assert seen[-1] - seen[0] > 1.0  # the chunks were not buffered into one
    assert seen[0] < seen[-1] / 2
    assert usage is not None and usage.completion_tokens > 0
    assert scripted.records[-1]["body"]["stream"] is True


def test_routed_n_above_one_streams_the_chosen_completion_with_keepalives(gw, scripted):
    scripted.script.update({"content": "Final answer: \\boxed{7}", "latency": 0.8})
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                      json={"model": "vote", "messages": ASK, "stream": True}) as r:
        raw = "".join(r.iter_text())
    assert raw.startswith(": keep-alive")
    events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == \
        "Final answer: \\boxed{7}"
    assert events[-1]["iapo"]["n"] == 5 and raw.rstrip().endswith("data: [DONE]")


def test_a_client_leaving_mid_stream_is_still_settled_logged_and_counted(start_gateway, scripted):
    gw = start_gateway(front_config(scripted.url))
    scripted.script.update({"content": " ".join(f"w{i}" for i in range(10)), "chunk_count": 10, "chunk_delay": 0.2})
    before = metrics_snapshot(gw.url)
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", headers={"authorization": f"Bearer {KEY_CAPPED}"},
                      json={"model": "scripted", "messages": ASK, "stream": True, "max_tokens": 200}) as r:
        request_id = r.headers["x-iapo-request-id"]
        next(r.iter_lines())
    row = wait_for(lambda: gw.row(request_id), timeout=10)
    assert row["status"] == 499 and row["completion_tokens"] > 0 and row["cost"] > 0
    spend = gw.spend("tier:capped")
    assert spend["dollars"] == pytest.approx(row["cost"]) and spend["reserved"] == 0
    after = metrics_snapshot(gw.url)
    assert metric_value(after, "iapo_requests_total", status="499") - metric_value(before, "iapo_requests_total",
                                                                                  status="499") == 1


# -- access ---------------------------------------------------------------------------------------
def test_require_key_refuses_anonymous_callers(start_gateway, scripted):
    gw = start_gateway(front_config(scripted.url, access={"require_key": True}))
    for path, method in (("/v1/chat/completions", "post"), ("/v1/models", "get")):
        r = httpx.request(method, f"{gw.url}{path}", json={"model": "scripted", "messages": ASK})
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    assert gw.client(KEY).chat.completions.create(model="scripted", messages=ASK).choices


def test_no_keys_configured_means_a_bearer_is_not_a_credential(start_gateway, scripted):
    cfg = front_config(scripted.url, api_keys=[], access={"require_key": True})
    gw = start_gateway(cfg)
    r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "scripted", "messages": ASK},
                   headers={"authorization": "Bearer anything-at-all"})
    assert r.status_code == 401


def test_models_outside_a_callers_list_are_404_and_not_listed(gw, scripted):
    narrow = gw.client(KEY_NARROW)
    assert sorted(m.id for m in narrow.models.list()) == ["single", "vote"]
    assert narrow.models.retrieve("vote").id == "vote"
    for model in ("scripted", "best"):
        with pytest.raises(openai.NotFoundError) as err:
            narrow.chat.completions.create(model=model, messages=ASK)
        assert err.value.body["code"] == "model_not_found"
        with pytest.raises(openai.NotFoundError):
            narrow.models.retrieve(model)
    assert {"scripted", "scripted-litellm", "vote", "best", "single"} <= {m.id for m in gw.client(KEY).models.list()}
    assert not [r for r in scripted.records if r["body"].get("model") in ("scripted", "best")]


def test_passthrough_obeys_max_n_and_caps_under_concurrency(gw, scripted):
    """100 concurrent passthrough requests, half asking n=64, against a $0.05 daily cap."""
    scripted.script.update({"completion_tokens": 200})

    async def one(client, n):
        try:
            await client.chat.completions.create(model="scripted", messages=ASK, n=n, max_tokens=200)
            return 200
        except openai.APIStatusError as exc:
            return exc.status_code

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=KEY_CAPPED, max_retries=0, timeout=30)
        statuses = await asyncio.gather(*(one(client, 64 if i % 2 else 4) for i in range(100)))
        await client.close()
        return statuses

    statuses = asyncio.run(run())
    assert statuses.count(400) == 50  # n=64 > max_n 4: refused before any upstream call
    assert statuses.count(200) >= 1 and statuses.count(200) + statuses.count(429) == 50
    assert max(r["body"].get("n", 1) for r in scripted.records) == 4
    worst = 4 * (0.01 * (len(json.dumps(ASK)) // 3 + 8) + 0.02 * 200) / 1000
    spend = gw.spend("tier:capped")
    assert spend["dollars"] <= 0.05 + worst and spend["reserved"] == 0
    assert spend["dollars"] == pytest.approx(statuses.count(200) * 4 * (0.02 * 200) / 1000, rel=0.2)
    m = metrics_snapshot(gw.url)
    assert metric_value(m, "iapo_spend_dollars", scope="tier", name="capped", window="per_day") == \
        pytest.approx(spend["dollars"])


# -- other endpoints ------------------------------------------------------------------------------
def test_embeddings_completions_and_responses_go_through_the_pipeline(gw, scripted):
    client = gw.client(KEY_CAPPED)
    before = metrics_snapshot(gw.url)
    e = client.embeddings.create(model="scripted", input=["hello", "world"])
    assert len(e.data) == 2 and e.usage.prompt_tokens > 0
    c = client.completions.create(model="scripted", prompt="Say hi", max_tokens=20)
    assert c.choices[0].text
    r = client.responses.create(model="scripted", input="Say hi", max_output_tokens=30)
    assert r.output_text and r.usage.output_tokens > 0
    chunks = list(client.completions.create(model="scripted", prompt="Say hi", max_tokens=20, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.choices[0].text
    with client.responses.stream(model="scripted", input="Say hi", max_output_tokens=30) as stream:
        assert stream.get_final_response().output_text == r.output_text
    assert [r["path"] for r in scripted.records] == ["/v1/embeddings", "/v1/completions", "/v1/responses",
                                                     "/v1/completions", "/v1/responses"]
    after = metrics_snapshot(gw.url)
    for endpoint, count in (("embeddings", 1), ("completions", 2), ("responses", 2)):
        assert metric_value(after, "iapo_requests_total", endpoint=endpoint, status="200") - \
            metric_value(before, "iapo_requests_total", endpoint=endpoint, status="200") == count
    rows = gw.rows("select endpoint, status, cost from requests where kind = 'proxy' order by created")
    assert [r["endpoint"] for r in rows] == ["embeddings", "completions", "responses", "completions", "responses"]
    assert all(r["status"] == 200 and r["cost"] > 0 for r in rows)
    spend = gw.spend("tier:capped")
    assert spend["dollars"] == pytest.approx(sum(r["cost"] for r in rows)) and spend["reserved"] == 0
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="vote", input="x")  # a route serves chat only


def test_unknown_paths_and_methods_get_openai_errors(gw):
    r = httpx.post(f"{gw.url}/v1/images/generations", json={})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
    r = httpx.get(f"{gw.url}/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]


# -- metrics tell the truth ------------------------------------------------------------------------
def test_status_labels_equal_what_clients_got_under_faults(gw, scripted):
    scripted.script.update({"error_rate": 0.5, "status": 500})
    got = []
    client = gw.client(KEY)
    before = metrics_snapshot(gw.url)
    cases = [("scripted", False), ("single", False), ("vote", False), ("scripted", True), ("single", True)]
    for i in range(24):
        model, stream = cases[i % len(cases)]
        if i == 20:
            scripted.script.update({"error_rate": 1.0, "status": 400})
        try:
            r = client.chat.completions.create(model=model, messages=ASK, stream=stream)
            if stream:
                list(r)
            got.append("200")
        except openai.APIStatusError as exc:
            got.append(str(exc.status_code))
    httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "nope", "messages": ASK})
    got.append("404")
    httpx.post(f"{gw.url}/v1/chat/completions", content=b"{", headers={"authorization": f"Bearer {KEY}"})
    got.append("400")
    httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "scripted", "messages": ASK},
               headers={"authorization": "Bearer wrong"})
    got.append("401")
    after = metrics_snapshot(gw.url)
    counted = {s: metric_value(after, "iapo_requests_total", status=s) - metric_value(before, "iapo_requests_total",
                                                                                     status=s)
               for s in set(got) | {"500"}}
    assert {"200", "502", "400"} <= set(got)
    assert counted == {s: got.count(s) for s in counted}
