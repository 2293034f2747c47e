"""BoN scorers: programmatic ones on tables, the judge through litellm against the replay upstream,
and the HTTP reward model through the route scorer (one call for objectives sharing a URL)."""
from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from gateway.config import Route, Upstream
from gateway.scorers import JsonValidScorer, LengthScorer, RegexScorer, RouteScorer
from gateway.upstream import UpstreamClient


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("scorer, texts, expected", [
    (RegexScorer(r"\bPASS\b"), ["PASS", "no", "it is PASS."], [1, 0, 1]),
    (JsonValidScorer(), ['{"a": 1}', "```json\n[1, 2]\n```", "{oops"], [1, 1, 0]),
    (LengthScorer(10), ["x" * 10, "x" * 5, "x" * 25, ""], [1.0, 0.5, 0.0, 0.0]),
])
def test_programmatic_scorers(scorer, texts, expected):
    assert run(scorer.score([], texts)).tolist() == pytest.approx(expected)


def test_judge_and_normalisation_through_litellm(replay):
    route = Route.model_validate({
        "model": "r", "upstream": "judge", "aggregator": "bon", "prompts": [{"id": "p"}],
        "objectives": [
            {"name": "quality", "scorer": {"type": "judge", "upstream": "judge", "rubric": "Be fair."}, "low": 0, "high": 10},
            {"name": "short", "scorer": {"type": "length", "target_chars": 4}},
        ]})

    async def score():
        upstream = UpstreamClient("judge", Upstream(model="openai/judge", api_base=f"{replay.url}/v1"))
        async with httpx.AsyncClient() as http:
            return await RouteScorer(route, {"judge": upstream}, http).score(
                [{"role": "user", "content": "q"}], ["abcd", "abcdefgh", "a" * 15])

    scores = run(score())
    assert scores.shape == (3, 2)
    assert scores[:, 0] == pytest.approx(np.array([4, 8, 15 % 11]) / 10)  # the judge's 0-10 mapped to [0, 1]
    assert scores[:, 1] == pytest.approx([1.0, 0.0, 0.0])


def test_http_reward_scorer_shares_one_call_per_url(replay, synthetic_envs):
    env = synthetic_envs["replay-bon"]
    route = Route.model_validate({
        "model": "r", "upstream": "u", "aggregator": "bon", "prompts": [{"id": "p"}],
        "objectives": [{"name": o, "scorer": {"type": "http", "url": f"{replay.url}/score/replay-bon", "field": o}}
                       for o in env.objectives]})
    calls = []

    async def score():
        async with httpx.AsyncClient(event_hooks={"request": [lambda r: _count(calls, r)]}) as http:
            return await RouteScorer(route, {}, http).score([], ["Response 2 to query 5 under prompt 1.", "junk"])

    scores = run(score())
    assert len(calls) == 1
    assert scores[0] == pytest.approx(env.outcome_scores[1, 5, 2])
    assert scores[1] == pytest.approx([0.0, 0.0])


async def _count(calls, request):
    calls.append(request.url)
