"""Replay upstream: an OpenAI-compatible server that samples answers from recorded distributions.

MV environments answer `... Final answer: \\boxed{c}`; BoN environments answer with an outcome id
that the paired reward endpoint (`POST /score/{model}`) scores from the recorded outcome vectors.
Fault switches (`POST /admin/faults`) inject errors, 429s and latency for reliability tests; the Files
and Batches API (`sandbox.batches`) answers batch jobs after a configurable delay.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
import zlib
from dataclasses import dataclass

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from policies.environments import BoNEnvironment, MVEnvironment
from sandbox.batches import BatchService

PROMPT_RE = re.compile(r"Prompt (\d+)")
QUERY_RE = re.compile(r"(?:Problem|Query) (\d+)")
OUTCOME_RE = re.compile(r"Response (\d+) to query (\d+) under prompt (\d+)")
TOKENS_PER_COST = 1e5  # completion tokens per unit of cost: 0.005–0.010 → 500–1000 tokens


@dataclass
class Faults:
    """Injected faults: each request fails with `error_status` at `error_rate`, sleeps `latency_ms`."""

    error_rate: float = 0.0
    error_status: int = 500
    retry_after: float | None = None
    latency_ms: float = 0.0
    spike_rate: float = 0.0
    spike_ms: float = 0.0
    drop_rate: float = 0.0  # the connection closes mid-body (declared length never arrives)
    slow_rate: float = 0.0  # the body trickles out over slow_ms
    slow_ms: float = 0.0


def problem_text(x: int) -> str:
    return f"Problem {x}: solve it and give the final answer."


def prompt_text(p: int) -> str:
    return f"Prompt {p}: you are a careful solver; think step by step."


def _index(pattern: re.Pattern, messages: list[dict], roles: set[str], size: int) -> int | None:
    for m in reversed(messages):
        if m.get("role") in roles:
            match = pattern.search(str(m.get("content") or ""))
            if match:
                return int(match.group(1)) % size
    return None


def _deliver(payload: dict, faults: Faults, rng: np.random.Generator) -> Response:
    """The answer, or a dropped or trickling one when those faults are switched on."""
    data = json.dumps(payload).encode()
    if faults.drop_rate and rng.random() < faults.drop_rate:
        # declare the full length, send half: the server closes the connection mid-body
        return Response(data[: len(data) // 2], media_type="application/json",
                        headers={"content-length": str(len(data))})
    if faults.slow_rate and rng.random() < faults.slow_rate:
        pieces = 10

        async def trickle():
            step = max(1, len(data) // pieces)
            for i in range(0, len(data), step):
                await asyncio.sleep(faults.slow_ms / 1000 / pieces)
                yield data[i:i + step]
        return StreamingResponse(trickle(), media_type="application/json")
    return Response(data, media_type="application/json")


async def _chunks(payload: dict, include_usage: bool):
    """A finished answer as OpenAI chat.completion.chunk events: a role delta, content in pieces, the finish."""
    base = {"id": payload["id"], "object": "chat.completion.chunk", "created": payload["created"],
            "model": payload["model"]}

    def event(data: dict) -> bytes:
        return f"data: {json.dumps({**base, **data})}\n\n".encode()

    for choice in payload["choices"]:
        i, text = choice["index"], choice["message"]["content"]
        yield event({"choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
        for start in range(0, len(text), 16):
            yield event({"choices": [{"index": i, "delta": {"content": text[start:start + 16]}, "finish_reason": None}]})
        yield event({"choices": [{"index": i, "delta": {}, "finish_reason": choice["finish_reason"]}]})
    if include_usage:
        yield event({"choices": [], "usage": payload["usage"]})
    yield b"data: [DONE]\n\n"


def create_replay_app(envs: dict[str, MVEnvironment | BoNEnvironment], seed: int = 0) -> Starlette:
    rng = np.random.default_rng(seed)
    faults = Faults()
    counters = {"requests": 0, "completions": 0}

    async def chat(request: Request) -> Response:
        body = json.loads(await request.body())
        counters["requests"] += 1
        if faults.latency_ms or faults.spike_rate:
            delay = faults.latency_ms + (faults.spike_ms if rng.random() < faults.spike_rate else 0.0)
            await asyncio.sleep(delay / 1000)
        if faults.error_rate and rng.random() < faults.error_rate:
            headers = {"retry-after": str(faults.retry_after)} if faults.retry_after is not None else {}
            return JSONResponse({"error": {"message": "injected fault", "type": "server_error", "code": None}},
                                status_code=faults.error_status, headers=headers)
        payload = answer(body)
        if body.get("stream"):
            return StreamingResponse(_chunks(payload, bool((body.get("stream_options") or {}).get("include_usage"))),
                                     media_type="text/event-stream")
        return _deliver(payload, faults, rng)

    def answer(body: dict) -> dict:
        """The chat.completion a request gets (shared by live calls and batch jobs)."""
        model = body.get("model", "")
        messages = body.get("messages") or []
        if model == "judge":  # a deterministic grader for judge-scorer tests: length of the answer mod 11
            text = str(messages[-1].get("content") or "").rsplit("Answer:\n", 1)[-1]
            return {"id": "judge", "object": "chat.completion", "created": int(time.time()), "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": f"{len(text) % 11}"},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}}
        env = envs.get(model) or next(iter(envs.values()))
        n = int(body.get("n") or 1)
        prompt = _index(PROMPT_RE, messages, {"system", "developer"}, env.n_prompts) or 0
        query = _index(QUERY_RE, messages, {"user"}, env.n_queries)
        if query is None:
            query = zlib.crc32(json.dumps(messages).encode()) % env.n_queries
        seed = body.get("seed")  # like a provider honouring `seed`: the same request draws the same answers
        draws = env.sample(prompt, query, n, np.random.default_rng([int(seed) & 0x7FFFFFFF, prompt, query])
                           if isinstance(seed, int) else rng)
        if isinstance(env, MVEnvironment):
            texts = [f"Working through problem {query} under prompt {prompt}. Final answer: \\boxed{{{int(c)}}}"
                     for c in draws]
        else:
            texts = [f"Response {int(m)} to query {query} under prompt {prompt}." for m in draws]
        tokens = max(1, int(round(env.cost[prompt] * TOKENS_PER_COST)))
        max_tokens = body.get("max_tokens")
        finish = "length" if max_tokens is not None and max_tokens < tokens else "stop"
        per_choice = min(tokens, max_tokens) if max_tokens is not None else tokens
        prompt_tokens = sum(len(str(m.get("content") or "")) for m in messages) // 4 + 1
        counters["completions"] += n
        return {
            "id": f"replay-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": finish}
                        for i, t in enumerate(texts)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": per_choice * n,
                      "total_tokens": prompt_tokens + per_choice * n},
        }

    async def score(request: Request) -> Response:
        env = envs.get(request.path_params["model"])
        if not isinstance(env, BoNEnvironment):
            return JSONResponse({"error": {"message": "no BoN environment of that name"}}, status_code=404)
        body = json.loads(await request.body())
        scores = []
        for text in body.get("completions", []):
            match = OUTCOME_RE.search(text or "")
            if not match:
                scores.append({name: 0.0 for name in env.objectives})
                continue
            m, x, p = (int(g) for g in match.groups())
            vector = env.outcome_scores[p % env.n_prompts, x % env.n_queries, m % env.outcome_probs.shape[-1]]
            scores.append({name: float(v) for name, v in zip(env.objectives, vector)})
        return JSONResponse({"scores": scores})

    async def gold(request: Request) -> Response:
        """Verifier: the gold answer of the problem named in the messages."""
        env = envs.get(request.path_params["model"])
        if not isinstance(env, MVEnvironment):
            return JSONResponse({"error": {"message": "no MV environment of that name"}}, status_code=404)
        x = _index(QUERY_RE, json.loads(await request.body()).get("messages") or [], {"user"}, env.n_queries)
        if x is None:
            return JSONResponse({"gold": None})
        return JSONResponse({"query": x, "gold": str(int(env.gold[x]))})

    async def set_faults(request: Request) -> Response:
        body = json.loads(await request.body() or b"{}")
        for key, value in body.items():
            if hasattr(faults, key):
                setattr(faults, key, value)
        return JSONResponse(faults.__dict__)

    async def stats(request: Request) -> Response:
        return JSONResponse(counters)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": k, "object": "model"} for k in envs]})

    batches = BatchService(answer)
    return Starlette(routes=[
        *batches.routes(),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/chat/completions", chat, methods=["POST"]),
        Route("/score/{model}", score, methods=["POST"]),
        Route("/gold/{model}", gold, methods=["POST"]),
        Route("/admin/faults", set_faults, methods=["POST"]),
        Route("/admin/stats", stats, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
    ])
