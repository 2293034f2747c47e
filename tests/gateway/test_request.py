"""The request parser: every endpoint's body is accepted or refused with a 4xx naming the problem,
whatever it holds (property tests), and hostile shapes (deep nesting, lone surrogates) are 400s."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from gateway.config import Limits
from gateway.errors import GatewayError
from gateway.openai_wire import error_body
from gateway.request import ENDPOINTS, ApiCall, parse_call

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "wizard"]) | json_values,
                                 "content": json_values})
fields = {"n": json_values, "temperature": json_values, "stream": json_values, "max_tokens": json_values,
          "stop": json_values, "seed": json_values, "top_p": json_values, "tools": json_values,
          "logprobs": json_values, "top_logprobs": json_values, "metadata": json_values, "stream_options": json_values,
          "prompt": json_values, "input": json_values, "max_output_tokens": json_values, "dimensions": json_values}
bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({"model": json_values, "messages": st.lists(message, max_size=3)}, optional=fields),
    st.fixed_dictionaries({"model": st.text(min_size=1, max_size=5), "input": json_values},
                          optional={k: v for k, v in fields.items() if k != "input"}),
    st.fixed_dictionaries({"model": st.text(min_size=1, max_size=5), "prompt": json_values},
                          optional={k: v for k, v in fields.items() if k != "prompt"}))


def check_refusal(err: GatewayError) -> None:
    body = error_body(err)["error"]
    assert 400 <= err.status < 500 and body["message"] and body["type"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies, endpoint=st.sampled_from(ENDPOINTS))
def test_every_endpoint_accepts_or_refuses_with_a_4xx(body, endpoint):
    try:
        call = parse_call(endpoint, json.dumps(body).encode(), Limits())
    except GatewayError as err:
        check_refusal(err)
        return
    assert isinstance(call, ApiCall) and isinstance(call.model, str) and call.body is not None
    json.dumps(call.body, ensure_ascii=False).encode("utf-8")  # what is accepted can be forwarded


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=200), endpoint=st.sampled_from(ENDPOINTS))
def test_arbitrary_bytes_are_refused_with_a_4xx(raw, endpoint):
    try:
        parse_call(endpoint, raw, Limits())
    except GatewayError as err:
        check_refusal(err)


CHAT = '{"model": "m", "messages": [{"role": "user", "content": %s}]}'


@pytest.mark.parametrize("content, code", [
    ("[" * 100_000 + "]" * 100_000, "invalid_json"),   # RecursionError in json.loads
    ("[" * 70 + "]" * 70, "invalid_json"),               # parses, but deeper than max_json_depth
    ('"\\ud800"', "invalid_json"),                       # a lone surrogate
    ('"ok \\udfff tail"', "invalid_json"),
])
def test_hostile_shapes_are_400s(content, code):
    with pytest.raises(GatewayError) as err:
        parse_call("chat", (CHAT % content).encode(), Limits())
    assert err.value.status == 400 and err.value.code == code


def test_surrogate_pairs_and_unknown_fields_pass():
    call = parse_call("chat", (CHAT % '"\\ud83d\\ude00"').encode(), Limits())
    assert call.messages[0]["content"] == "\U0001F600"
    raw = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "reasoning_effort": "low",
                      "prediction": {"type": "content", "content": "x"}, "x-custom": [1, 2]}).encode()
    assert parse_call("chat", raw, Limits()).body["x-custom"] == [1, 2]


@pytest.mark.parametrize("endpoint, body, param", [
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9}, "max_tokens"),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}] * 300}, "messages"),
    ("responses", {"model": "m", "input": "x", "max_output_tokens": 10**9}, "max_output_tokens"),
    ("embeddings", {"model": "m"}, "input"),
    ("completions", {"model": "m", "prompt": "x", "n": 0}, "n"),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 99}, "top_logprobs"),
])
def test_limits_and_missing_fields_name_the_parameter(endpoint, body, param):
    with pytest.raises(GatewayError) as err:
        parse_call(endpoint, json.dumps(body).encode(), Limits())
    assert err.value.status == 400 and err.value.param == param
