"""The scripted upstream over real HTTP on loopback, read by the official openai client and litellm."""
from __future__ import annotations

import asyncio
import json
import os
import time

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import httpx
import openai
import pytest

from sandbox.scripted import Script, create_scripted_app
from sandbox.servers import ServerThread

MESSAGES = [{"role": "user", "content": "Say hello."}]
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def upstream():
    """One scripted upstream for the module; `script` is the live Python object it answers from."""
    script = Script()
    server = ServerThread(create_scripted_app(script)).start()
    server.script = script
    server.http = httpx.Client(base_url=server.url)
    yield server
    server.http.close()
    server.stop()


@pytest.fixture
def script(upstream) -> Script:
    """A fresh default script, no recorded requests, zeroed counters (reset over HTTP)."""
    for path, body in (("/script", {}), ("/recorded/clear", None), ("/stats/clear", None)):
        upstream.http.post(path, json=body).raise_for_status()
    return upstream.script


@pytest.fixture(scope="module")
def client(upstream) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{upstream.url}/v1", api_key="sk-test", max_retries=0)


@pytest.fixture
def aclient(upstream) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{upstream.url}/v1", api_key="sk-test", max_retries=0)


def recorded(upstream) -> list[dict]:
    return upstream.http.get("/recorded").json()


def stats(upstream) -> dict:
    return upstream.http.get("/stats").json()


def test_chat_content_usage_and_fingerprint(script, client):
    script.update({"prompt_tokens": 12, "completion_tokens": 7, "cached_tokens": 4, "reasoning_tokens": 3})
    r = client.chat.completions.create(model="gpt-scripted", messages=MESSAGES)
    assert r.object == "chat.completion" and r.model == "gpt-scripted" and r.system_fingerprint == "fp_scripted"
    assert r.choices[0].message.content == "Hello from the scripted upstream."
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.tool_calls is None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (12, 7, 19)
    assert r.usage.prompt_tokens_details.cached_tokens == 4
    assert r.usage.completion_tokens_details.reasoning_tokens == 3


def test_n_choices_cycle_contents(script, client):
    script.contents = ["\\boxed{1}", "\\boxed{2}", "\\boxed{1}"]
    r = client.chat.completions.create(model="m", messages=MESSAGES, n=4)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.message.content for c in r.choices] == ["\\boxed{1}", "\\boxed{2}", "\\boxed{1}", "\\boxed{1}"]
    assert r.usage.completion_tokens == 4 * 3  # "\\boxed{1}" is 9 characters: 3 tokens each


def test_tool_calls(script, client):
    script.tool_calls = [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    r = client.chat.completions.create(model="m", messages=MESSAGES, tools=[WEATHER_TOOL])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}


def test_tool_calls_per_choice_may_disagree_or_be_invalid(script, client):
    script.tool_calls_per_choice = [[{"name": "a", "arguments": "{}"}], [{"name": "b", "arguments": "{not json"}]]
    r = client.chat.completions.create(model="m", messages=MESSAGES, n=3)
    calls = [c.message.tool_calls[0].function for c in r.choices]
    assert [(f.name, f.arguments) for f in calls] == [("a", "{}"), ("b", "{not json"), ("a", "{}")]
    assert len({c.message.tool_calls[0].id for c in r.choices}) == 3


def test_refusal(script, client):
    script.refusal = "I can't help with that."
    r = client.chat.completions.create(model="m", messages=MESSAGES)
    assert r.choices[0].message.refusal == "I can't help with that." and r.choices[0].message.content is None


def test_logprobs_with_top_logprobs(script, client):
    r = client.chat.completions.create(model="m", messages=MESSAGES, logprobs=True, top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == r.choices[0].message.content and len(entries) == 5
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token for e in entries)
    assert all(e.logprob < 0 and bytes(e.bytes).decode() == e.token for e in entries)
    assert client.chat.completions.create(model="m", messages=MESSAGES).choices[0].logprobs is None


def test_stream_content_usage_and_logprobs(script, client):
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, stream=True, logprobs=True,
                                                 top_logprobs=2, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the scripted upstream."
    tokens = [e.token for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert "".join(tokens) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 0
    assert chunks[0].system_fingerprint == "fp_scripted"


def test_stream_without_include_usage_has_no_usage_chunk(script, client):
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, stream=True))
    assert all(c.choices and c.usage is None for c in chunks)


def test_stream_tool_call_arguments_accumulate(script, client):
    script.update({"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
                                  {"name": "get_time", "arguments": "{\"tz\": \"CET\"}"}], "chunk_count": 4})
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(model="m", messages=MESSAGES, tools=[WEATHER_TOOL], stream=True):
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": delta.id, "name": delta.function.name, "arguments": ""})
            assert delta.id is None or delta.id == call["id"]
            call["arguments"] += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and calls[0]["id"].startswith("call_")
    assert calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "unit": "celsius"}
    assert (calls[1]["name"], json.loads(calls[1]["arguments"])) == ("get_time", {"tz": "CET"})


def test_stream_n_choices_carry_their_index(script, client):
    script.contents = ["first answer here", "second answer"]
    texts: dict[int, str] = {}
    for chunk in client.chat.completions.create(model="m", messages=MESSAGES, n=2, stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert texts == {0: "first answer here", 1: "second answer"}


def test_stream_is_incremental(script, client):
    script.update({"chunk_count": 10, "chunk_delay": 0.2})
    start = time.monotonic()
    stamps = [(time.monotonic() - start, c) for c in client.chat.completions.create(
        model="m", messages=MESSAGES, stream=True) if c.choices and c.choices[0].delta.content]
    assert len(stamps) == 10 and "".join(c.choices[0].delta.content for _, c in stamps) == script.content
    assert stamps[0][0] < 1.0 and stamps[-1][0] > 1.5


def test_async_client_stream_and_latency(script, aclient):
    script.update({"content": "async hello", "latency": 0.2})

    async def scenario() -> None:
        start = time.monotonic()
        r = await aclient.chat.completions.create(model="m", messages=MESSAGES)
        assert r.choices[0].message.content == "async hello" and time.monotonic() - start >= 0.2
        stream = await aclient.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in stream]) == "async hello"

    asyncio.run(scenario())


def test_litellm_parses_tool_calls(upstream, script):
    import litellm

    script.tool_calls = [{"name": "get_weather", "arguments": {"city": "Oslo"}}]
    r = litellm.completion(model="openai/scripted", api_base=f"{upstream.url}/v1", api_key="x",
                           messages=MESSAGES, tools=[WEATHER_TOOL])
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Oslo"}
    assert r.choices[0].finish_reason == "tool_calls" and r.usage.total_tokens > 0


def test_embeddings_deterministic(script, client, upstream):
    a = client.embeddings.create(model="emb", input=["alpha", "beta"])
    b = client.embeddings.create(model="emb", input="alpha", dimensions=16, encoding_format="float")
    assert [d.index for d in a.data] == [0, 1] and len(a.data[0].embedding) == 16
    assert a.data[0].embedding == pytest.approx(b.data[0].embedding, abs=1e-6)
    assert a.data[0].embedding != a.data[1].embedding and a.usage.prompt_tokens == a.usage.total_tokens > 0
    assert len(client.embeddings.create(model="emb", input="x", dimensions=5).data[0].embedding) == 5


def test_legacy_completions(script, client):
    script.contents = ["one", "two"]
    r = client.completions.create(model="m", prompt="Count:", n=2, logprobs=1)
    assert r.object == "text_completion" and [c.text for c in r.choices] == ["one", "two"]
    assert r.choices[0].logprobs.tokens == ["one"] and r.usage.total_tokens > 0
    script.update({"content": "streamed text here", "contents": None})
    chunks = list(client.completions.create(model="m", prompt="Go", stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "streamed text here"
    assert chunks[-1].usage.completion_tokens == 5


def test_responses_create_and_stream(script, client):
    script.update({"content": "Responses hello.", "completion_tokens": 4})
    r = client.responses.create(model="m", input="hi", instructions="be brief")
    assert r.object == "response" and r.status == "completed" and r.output_text == "Responses hello."
    assert r.output[0].content[0].annotations == [] and r.usage.output_tokens == 4
    assert r.usage.total_tokens == r.usage.input_tokens + 4
    with client.responses.stream(model="m", input="hi") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "Responses hello." and final.output_text == "Responses hello."
    assert final.usage.output_tokens == 4
    events = [e.type for e in client.responses.create(model="m", input="hi", stream=True)]
    assert events[0] == "response.created" and events[-1] == "response.completed"


def test_models(script, client):
    assert [m.id for m in client.models.list()] == ["scripted"]


def test_recorded_bodies_arrive_unchanged(script, client, upstream):
    extra = {"metadata": {"team": "qa", "run": "7"}, "reasoning_effort": "low",
             "prediction": {"type": "content", "content": "Hello"}}
    client.chat.completions.create(model="m", messages=MESSAGES, **extra, extra_body={"x_custom": [1, {"a": None}]})
    raw = {"model": "m", "messages": MESSAGES, "weird": {"nested": [1.5, True, None]}}
    upstream.http.post("/chat/completions", content=json.dumps(raw))
    first, second = recorded(upstream)
    assert first["path"] == "/v1/chat/completions" and first["authorization"] is True
    assert first["body"] == {"model": "m", "messages": MESSAGES, **extra, "x_custom": [1, {"a": None}]}
    assert second == {**second, "path": "/chat/completions", "body": raw, "authorization": False}
    assert "sk-test" not in json.dumps(recorded(upstream))
    assert stats(upstream)["by_path"] == {"/v1/chat/completions": 1, "/chat/completions": 1}


def test_max_in_flight_counts_concurrency(script, aclient, upstream):
    script.latency = 0.3

    async def burst() -> None:
        await asyncio.gather(*(aclient.chat.completions.create(model="m", messages=MESSAGES) for _ in range(8)))

    asyncio.run(burst())
    counts = stats(upstream)
    assert 2 <= counts["max_in_flight"] <= 8 and counts["in_flight"] == 0 and counts["requests"] == 8


@pytest.mark.parametrize("status, error", [(429, openai.RateLimitError), (500, openai.InternalServerError),
                                           (400, openai.BadRequestError), (401, openai.AuthenticationError),
                                           (404, openai.NotFoundError), (503, openai.InternalServerError)])
def test_fail_next_raises_the_right_exception(script, client, status, error):
    script.update({"status": status, "fail_next": 1, "retry_after": 0})
    with pytest.raises(error) as caught:
        client.chat.completions.create(model="m", messages=MESSAGES)
    assert caught.value.status_code == status and caught.value.body["message"] == script.error_message
    assert client.chat.completions.create(model="m", messages=MESSAGES).choices[0].message.content


def test_client_retries_through_failures(script, upstream):
    upstream.http.post("/script?merge=true", json={"fail_next": 2, "status": 503, "retry_after": 0.01})
    retrying = openai.OpenAI(base_url=f"{upstream.url}/v1", api_key="k", max_retries=2)
    assert retrying.chat.completions.create(model="m", messages=MESSAGES).choices[0].message.content
    assert (stats(upstream)["requests"], stats(upstream)["errors"]) == (3, 2)


def test_error_rate_is_deterministic(script, client):
    script.update({"error_rate": 0.5, "status": 500})
    outcomes = []
    for _ in range(6):
        try:
            client.chat.completions.create(model="m", messages=MESSAGES)
            outcomes.append("ok")
        except openai.InternalServerError:
            outcomes.append("error")
    assert outcomes == ["ok", "error"] * 3


def test_script_endpoint_and_bad_requests(script, upstream):
    assert upstream.http.post("/script", json={"no_such_field": 1}).status_code == 400
    assert upstream.http.post("/script", json={"content": "set over HTTP"}).json()["content"] == "set over HTTP"
    assert script.content == "set over HTTP"
    missing = upstream.http.post("/v1/chat/completions", json={"model": "m"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"
    garbled = upstream.http.post("/v1/chat/completions", content=b"{not json")
    assert garbled.status_code == 400 and garbled.json()["error"]["type"] == "invalid_request_error"
