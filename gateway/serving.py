"""Serves one chat request: tier → route → arm → N upstream completions → aggregate → log."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
import uuid
from dataclasses import dataclass

import httpx
import numpy as np

from gateway.access import Access, Caller
from gateway.config import ConfigError, Route, Settings, Tier, load_config
from gateway.errors import GatewayError, invalid, not_found, upstream_failed
from gateway.metrics import GatewayMetrics
from gateway.prompting import merge_params, query_key, render_messages
from gateway.request import ChatRequest
from gateway.runtime import Runtime
from gateway.upstream import Completion
from policies.aggregate import best_of_n, majority_vote
from policies.arms import Arm, Policy
from policies.budget import clamp_n
from store.database import open_database
from store.keys import KeyStore
from store.policy_store import PolicyStore
from store.spend import BudgetExhausted, SpendLedger
from store.writer import LogWriter, RequestLog

log = logging.getLogger("iapo.gateway")


@dataclass
class Served:
    """What the HTTP layer needs to answer: the OpenAI body, extra headers, the chosen text."""

    body: dict
    headers: dict[str, str]
    text: str = ""
    finish_reason: str = "stop"
    upstream_s: float = 0.0


class Gateway:
    """The running gateway: the current Runtime (config-derived), policy, writer, ledger, metrics."""

    def __init__(self, settings: Settings, config_path: str | None = None) -> None:
        self.config_path = config_path
        self.metrics = GatewayMetrics()
        self.rng = np.random.default_rng(settings.seed)
        self.policy = Policy()
        self._initial = settings
        self.rt: Runtime | None = None
        self.writer: LogWriter | None = None
        self._tasks: list[asyncio.Task] = []
        self._config_mtime = _mtime(config_path)

    @property
    def settings(self) -> Settings:
        return self.rt.settings if self.rt else self._initial

    async def start(self) -> None:
        s = self._initial
        self.http = httpx.AsyncClient(limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
        self.rt = Runtime.build(s, self.http, self.metrics)
        self.db = open_database(s.store.path)
        self.policies = PolicyStore(self.db)
        self.ledger = SpendLedger(open_database(s.store.path))
        self.access = Access(KeyStore(open_database(s.store.path)))
        self.metrics.attach_ledger(self.ledger, lambda: self.settings)
        self.writer = LogWriter(s.store.path, max_queue=s.store.queue_size, batch_size=s.store.batch_size)
        self._reload_policy()
        self._tasks.append(asyncio.create_task(self._watch()))
        if s.train.interval_seconds:
            self._tasks.append(asyncio.create_task(self._train_periodically()))
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload)
        except (ValueError, RuntimeError, NotImplementedError):  # not the main thread (tests) or no SIGHUP
            pass

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.writer:
            await asyncio.to_thread(self.writer.close)
        await self.http.aclose()
        await self.rt.aclose()
        self.db.conn.close()

    def reload(self) -> bool:
        """Re-read the config file; a valid one replaces the Runtime between requests, an invalid one is
        refused (logged and counted) and the old one keeps serving."""
        if not self.config_path:
            return False
        try:
            settings = load_config(self.config_path)
            if settings.store.path != self.settings.store.path:
                raise ConfigError("store.path cannot change while serving; restart to move the store")
            runtime = Runtime.build(settings, self.http, self.metrics)
        except ConfigError as exc:
            log.error("config reload rejected, keeping the running config: %s", exc)
            self.metrics.config_reloads.labels("error").inc()
            self.metrics.config_ok.set(0)
            return False
        old, self.rt = self.rt, runtime
        self.access.clear()
        self.metrics.config_reloads.labels("ok").inc()
        self.metrics.config_ok.set(1)
        log.info("config reloaded from %s", self.config_path)
        asyncio.get_running_loop().call_later(60, lambda: asyncio.ensure_future(old.aclose()))
        return True

    def _reload_policy(self) -> None:
        version = self.policies.latest_version()
        if version != self.policy.version:
            self.policy = self.policies.load(version)
            log.info("serving policy version %d", version)
        self.metrics.policy_version.set(self.policy.version)

    async def _watch(self) -> None:
        """Between requests: switch to a newly published policy; reload a changed config file."""
        while True:
            await asyncio.sleep(self.settings.store.policy_poll_seconds)
            try:
                self._reload_policy()
                self.metrics.log_queue.set(self.writer.depth())
                mtime = _mtime(self.config_path)
                if mtime != self._config_mtime:
                    self._config_mtime = mtime
                    self.reload()
            except Exception:
                log.exception("watcher step failed; serving continues on policy version %d", self.policy.version)

    async def _train_periodically(self) -> None:
        """`train.interval_seconds`: re-learn every route in a worker thread; serving never waits on it."""
        from gateway.trainer import summary, train_routes

        while True:
            await asyncio.sleep(self.settings.train.interval_seconds)
            try:
                reports = await asyncio.to_thread(lambda: asyncio.run(train_routes(self.settings)))
                for report in reports:
                    log.info("%s", summary(report))
            except Exception:
                log.exception("scheduled training failed; serving continues on version %d", self.policy.version)

    # -- resolution -------------------------------------------------------------------------
    def resolve(self, authorization: str | None) -> Caller:
        return self.access.resolve(authorization, self.rt)

    def resolve_tier(self, authorization: str | None) -> Tier:
        return self.resolve(authorization).tier

    def arm_for(self, route: Route, tier: Tier) -> Arm:
        arm = self.policy.arm_for(route.model, tier.name)
        if arm is not None and any(p.id == arm.prompt_id for p in route.prompts):
            return arm
        start = route.start.get(tier.name) or route.start.get("default")
        return Arm(start.prompt, start.n) if start else Arm(route.prompts[0].id, 1)

    # -- serving ----------------------------------------------------------------------------
    async def chat(self, req: ChatRequest, caller: Caller) -> Served:
        rt = self.rt  # one config for the whole request, even if a reload swaps it meanwhile
        tier = caller.tier
        route = rt.settings.route(req.model)
        if route is None:
            if req.model in rt.upstreams:
                return await self.proxy(rt, req, tier)
            raise not_found(f"The model `{req.model}` does not exist or you do not have access to it.",
                            code="model_not_found", param="model")
        if req.n != 1:
            raise invalid(f"'n' must be 1 for the routed model `{route.model}`: the gateway chooses how many "
                          "completions to draw and returns the best one.", param="n")
        return await self.serve_routed(rt, req, route, caller)

    async def serve_routed(self, rt: Runtime, req: ChatRequest, route: Route, caller: Caller) -> Served:
        start = time.perf_counter()
        tier = caller.tier
        upstream = rt.upstreams[route.upstream]
        arm = self.arm_for(route, tier)
        prompt = route.prompt(arm.prompt_id)
        params = merge_params(req.params, prompt.params)
        messages = render_messages(route, arm.prompt_id, req.messages)
        worst, worst_tokens = upstream.worst_case(messages, params)
        n = clamp_n(arm.n, route_n_max=route.n_max, tier_max_n=tier.max_n,
                    max_cost_per_request=tier.max_cost_per_request, worst_cost_per_completion=worst)
        reservation = self._reserve(rt, route, caller, n, worst, worst_tokens)
        n = reservation.n if reservation else n
        completions: list[Completion] = []
        try:
            completions = await upstream.complete(messages, params, n)
        finally:
            if reservation:
                self.ledger.settle(reservation, float(sum(c.cost for c in completions)),
                                   sum(c.prompt_tokens + c.completion_tokens for c in completions))
        upstream_s = max((c.latency_s for c in completions), default=0.0)
        ok = [i for i, c in enumerate(completions) if not c.error]
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        labels = (route.model, tier.name)
        record = {
            "id": request_id, "created": time.time(), "kind": "serve", "route": route.model, "tier": tier.name,
            "upstream": route.upstream, "policy_version": self.policy.version, "prompt_id": arm.prompt_id,
            "prompt_version": rt.prompt_versions[(route.model, arm.prompt_id)], "n": n,
            "aggregator": route.aggregator, "messages": json.dumps(req.messages, ensure_ascii=False),
            "query_key": query_key(req.messages), "failed": len(completions) - len(ok),
            "upstream_latency_s": upstream_s,
        }
        self.metrics.upstream_latency.labels(route.upstream).observe(upstream_s)
        if not ok:
            kinds = sorted({c.error_kind or "other" for c in completions})
            status = 400 if kinds == ["bad_request"] else 502
            record.update(status=status, error=f"all {n} upstream completions failed ({', '.join(kinds)})",
                          latency_s=time.perf_counter() - start)
            await self._log(record, completions, [None] * n, None)
            self.metrics.requests.labels(*labels, arm.prompt_id, str(n), str(status)).inc()
            if status == 400:  # the upstream refused the request itself: the caller's to fix, not a gateway fault
                raise GatewayError(400, f"The upstream model rejected the request: {completions[0].error}",
                                   code="upstream_rejected")
            raise upstream_failed(f"The upstream model failed for all {n} completions ({', '.join(kinds)}).")
        chosen, answers, scores, info = await self._aggregate(rt, route, tier, messages, completions, ok)
        usage = _usage(completions)
        cost = float(sum(c.cost for c in completions))
        quality = self._observe_quality(rt, route, tier, info, scores, chosen)
        iapo = {
            "route": route.model, "tier": tier.name, "prompt_id": arm.prompt_id, "n": n,
            "aggregator": route.aggregator, "policy_version": self.policy.version, "failed": len(completions) - len(ok),
            "cost": cost, "scores": quality, **info,
        }
        text = completions[chosen].text or ""
        finish = completions[chosen].finish_reason or "stop"
        body = {
            "id": request_id, "object": "chat.completion", "created": int(record["created"]), "model": route.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                         "logprobs": None}],
            "usage": usage, "iapo": iapo,
        }
        headers = {"x-iapo-prompt": arm.prompt_id, "x-iapo-n": str(n), "x-iapo-policy-version": str(self.policy.version)}
        record.update(status=200, chosen_index=chosen, chosen_answer=info.get("answer"), tie_size=info.get("tie_size"),
                      vote_share=info.get("vote_share"), latency_s=time.perf_counter() - start, **_usage_cols(usage, cost))
        await self._log(record, completions, answers, scores)
        self._count(route.model, tier, arm, n, completions, usage, cost, record["latency_s"])
        if route.aggregator == "bon" and quality:
            w = rt.weights(route, tier)
            self.metrics.utility.labels(*labels).observe(
                float(np.dot(w, [quality[o] for o in rt.scorers[route.model].names])) - tier.cost_weight * cost)
        return Served(body=body, headers=headers, text=text, finish_reason=finish, upstream_s=upstream_s)

    def _reserve(self, rt: Runtime, route: Route, caller: Caller, n: int, worst: float, tokens: int):
        """Book the request's worst case under its tier's and key's caps: 429, or fewer completions."""
        caps = rt.caps(caller.tier, caller.key_id)
        if not caps:
            return None
        try:
            reservation = self.ledger.reserve(caps, n, worst, tokens, allow_fewer=caller.tier.on_exhausted == "degrade")
        except BudgetExhausted as exc:
            self.metrics.budget_rejections.labels(caller.tier.name, f"{exc.cap.scope.split(':')[0]}:{exc.cap.window}").inc()
            raise GatewayError(429, f"Budget exhausted: {exc}.", type="insufficient_quota", code="budget_exhausted",
                               headers={"retry-after": str(max(1, int(exc.reset - time.time()) + 1))}) from None
        if reservation.n < n:
            self.metrics.budget_degradations.labels(route.model, caller.tier.name).inc()
        return reservation

    async def _aggregate(self, rt: Runtime, route, tier, messages, completions: list[Completion], ok: list[int]):
        """Chosen index, per-completion answers, per-completion scores (n, K) or None, vote/score info."""
        n = len(completions)
        if route.aggregator == "mv":
            extract = rt.extractors[route.model]
            answers = [extract(c.text) if not c.error else None for c in completions]
            vote = majority_vote(answers, self.rng)
            chosen = vote.index if vote.answer is not None else ok[0]
            share = vote.vote_share * n / len(ok)
            return chosen, answers, None, {"answer": vote.answer, "tie_size": vote.tie_size, "vote_share": share}
        scorer = rt.scorers[route.model]
        texts = [completions[i].text or "" for i in ok]
        try:
            ok_scores = await scorer.score(messages, texts)
        except Exception as exc:
            log.warning("scoring failed on route %s: %s", route.model, exc)
            self.metrics.upstream_errors.labels("scorer", "scoring").inc()
            return ok[0], [None] * n, None, {"scoring_error": str(exc)[:200]}
        scores = np.full((n, len(scorer.names)), np.nan)
        scores[ok] = ok_scores
        chosen = ok[best_of_n(ok_scores, rt.weights(route, tier), self.rng)]
        return chosen, [None] * n, scores, {}

    def _observe_quality(self, rt: Runtime, route, tier, info, scores, chosen) -> dict:
        labels = (route.model, tier.name)
        if route.aggregator == "mv":
            self.metrics.quality.labels(*labels, "vote_share").observe(info["vote_share"])
            return {"vote_share": info["vote_share"]}
        if scores is None:
            return {}
        values = {name: float(scores[chosen, k]) for k, name in enumerate(rt.scorers[route.model].names)}
        for name, value in values.items():
            self.metrics.quality.labels(*labels, name).observe(value)
        return values

    def _count(self, route_name, tier, arm, n, completions, usage, cost, latency) -> None:
        m = self.metrics
        labels = (route_name, tier.name)
        m.requests.labels(*labels, arm.prompt_id, str(n), "200").inc()
        m.completions.labels(*labels, "serve").inc(sum(1 for c in completions if not c.error))
        failed = sum(1 for c in completions if c.error)
        if failed:
            m.failed_completions.labels(*labels).inc(failed)
        m.tokens.labels(*labels, "prompt").inc(usage["prompt_tokens"])
        m.tokens.labels(*labels, "completion").inc(usage["completion_tokens"])
        m.cost.labels(*labels, "serve").inc(cost)
        m.latency.labels(*labels).observe(latency)

    async def _log(self, record: dict, completions: list[Completion], answers, scores) -> None:
        rows = [
            {
                "request_id": record["id"], "idx": i, "text": c.text, "answer": answers[i],
                "scores": json.dumps([None if np.isnan(v) else float(v) for v in scores[i]]) if scores is not None else None,
                "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens, "cost": c.cost,
                "finish_reason": c.finish_reason, "latency_s": c.latency_s, "error": c.error,
            }
            for i, c in enumerate(completions)
        ]
        await self.writer.submit(RequestLog(record, rows))

    async def proxy(self, rt: Runtime, req: ChatRequest, tier: Tier) -> Served:
        """A model naming an upstream: forwarded unchanged (the caller's n and params), logged and counted."""
        start = time.perf_counter()
        upstream = rt.upstreams[req.model]
        completions = await upstream.complete(req.messages, req.params, req.n)
        ok = [i for i, c in enumerate(completions) if not c.error]
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        usage = _usage(completions)
        cost = float(sum(c.cost for c in completions))
        record = {
            "id": request_id, "created": time.time(), "kind": "proxy", "route": None, "tier": tier.name,
            "upstream": req.model, "n": req.n, "messages": json.dumps(req.messages, ensure_ascii=False),
            "query_key": query_key(req.messages), "failed": len(completions) - len(ok),
            "latency_s": time.perf_counter() - start, "status": 200 if ok else 502, **_usage_cols(usage, cost),
        }
        await self._log(record, completions, [None] * len(completions), None)
        self._count(f"upstream:{req.model}", tier, Arm("passthrough", req.n), req.n, completions, usage, cost,
                    record["latency_s"])
        if not ok:
            if all(c.error_kind == "bad_request" for c in completions):
                raise GatewayError(400, f"The upstream model rejected the request: {completions[0].error}",
                                   code="upstream_rejected")
            raise upstream_failed(f"The upstream model failed: {completions[0].error}")
        body = {
            "id": request_id, "object": "chat.completion", "created": int(record["created"]), "model": req.model,
            "choices": [{"index": j, "message": {"role": "assistant", "content": completions[i].text},
                         "finish_reason": completions[i].finish_reason or "stop", "logprobs": None}
                        for j, i in enumerate(ok)],
            "usage": usage,
        }
        first = completions[ok[0]]
        return Served(body=body, headers={}, text=first.text or "", finish_reason=first.finish_reason or "stop",
                      upstream_s=max(c.latency_s for c in completions))

def _mtime(path: str | None) -> float | None:
    try:
        return os.stat(path).st_mtime if path else None
    except OSError:
        return None


def _usage(completions: list[Completion]) -> dict:
    prompt = sum(c.prompt_tokens for c in completions)
    completion = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _usage_cols(usage: dict, cost: float) -> dict:
    return {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"], "cost": cost}
