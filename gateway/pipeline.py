"""One request, top to bottom, for every model a caller may name:

    caller → authorise the model → plan (the policy's arm, or passthrough) → reserve under caps
    → call the upstream → aggregate | forward → settle → log → count

Nothing reaches an upstream any other way. Domain errors are raised as GatewayError (already
counted); the HTTP edge maps them to responses.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator

import numpy as np

from gateway.access import Access, Caller, Target
from gateway.aggregation import Choice, WaveScores, choose
from gateway.errors import (GatewayError, UpstreamRejected, internal_error, invalid, store_unavailable,
                            upstream_failed)
from gateway.openai_wire import chat_chunks, chat_completion, sse, sse_error, usage_of
from gateway.prompting import apply_arm
from gateway.records import RequestRecord, query_key, request_log
from gateway.request import ApiCall, parse_call
from gateway.runtime import Runtime
from gateway.streams import MessageBuilder, Relay, is_usage_only, tokens_of
from gateway.transports import UpstreamError
from gateway.upstream import Completion, Draw, UpstreamClient
from gateway.worst_case import INJECTED_LIMIT_FIELD, Bound, bound, token_limit
from policies.aggregate import answer_of
from policies.arms import Arm
from policies.budget import clamp_n
from policies.stopping import StoppingRule, Waves, reached, settled
from store.errors import StoreUnavailable
from store.spend import BudgetExhausted, Reservation

if TYPE_CHECKING:
    from gateway.service import GatewayService

log = logging.getLogger("iapo.pipeline")
# in a stream, what the x-iapo-logged header says elsewhere: its rows wait in memory (the store is failing)
LOGGED_PENDING = b": x-iapo-logged pending\n\n"
OWNED_ON_ROUTES = ("model", "messages", "n", "stream", "stream_options")


@dataclass
class Outcome:
    """What the HTTP edge sends: a JSON body (dict, or the provider's bytes) or an SSE stream."""

    status: int
    body: dict | bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    stream: AsyncIterator[bytes] | None = None


@dataclass
class Plan:
    """How one request will be served: the upstream, the body it gets, N, and the worst case per completion."""

    target: Target
    upstream: UpstreamClient
    body: dict
    n: int
    worst_dollars: float
    worst_tokens: int
    route: object | None = None
    arm: Arm | None = None
    overridden: list[str] = field(default_factory=list)
    limited: str | None = None  # the token-limit field the gateway added (a bounded tier, no limit sent)
    bound: Bound | None = None  # tokens of one completion at most
    completion_worst: float = 0.0  # dollars of one completion at most (worst_dollars adds its scoring)


@dataclass
class Ticket:
    """One request in flight: its record, its labels for metrics, and what it has reserved."""

    record: RequestRecord
    started: float
    caller: Caller | None = None
    plan: Plan | None = None
    reservation: Reservation | None = None
    upstream_s: float = 0.0
    counted: bool = False
    rt: Runtime | None = None
    degraded: bool = False  # a cap had no room for the planned arm: a cheaper one is served

    @property
    def route_label(self) -> str:
        if self.plan is None:
            return "-"
        return self.plan.target.name if self.plan.target.kind == "route" else f"upstream:{self.plan.target.name}"


class Pipeline:
    def __init__(self, service: "GatewayService") -> None:
        self.service = service

    # -- the spine ------------------------------------------------------------------------------
    async def handle(self, endpoint: str, raw: bytes, authorization: str | None) -> Outcome:
        svc = self.service
        rt = svc.rt  # one config for the whole request, even if a reload swaps it meanwhile
        prefix = {"chat": "chatcmpl", "completions": "cmpl", "embeddings": "emb", "responses": "resp"}[endpoint]
        ticket = Ticket(RequestRecord(id=f"{prefix}-{uuid.uuid4().hex}", created=time.time(), kind="proxy",
                                      endpoint=endpoint), time.perf_counter())
        self._begin(ticket, rt)
        handed_off = False
        try:
            ticket.caller = svc.access.resolve(authorization, rt)
            ticket.record.tier, ticket.record.key_id = ticket.caller.tier.name, ticket.caller.key_id
            call = parse_call(endpoint, raw, rt.settings.limits)
            target = Access.authorise(ticket.caller, call.model, rt)
            ticket.plan = self.plan(rt, call, ticket.caller, target)
            svc.require_store()
            await self.reserve(rt, ticket, call)
            self._describe(ticket, call)
            if call.stream:
                handed_off = True  # the stream's own task settles, logs, counts and leaves in-flight
                return await self._stream(rt, call, ticket)
            if target.kind == "route":
                return await self._serve_route(rt, call, ticket)
            return await self._forward(call, ticket)
        except GatewayError as err:
            self._count(ticket, err.status)
            raise
        except Exception:
            log.exception("unexpected error serving %s request %s", endpoint, ticket.record.id)
            if ticket.reservation is not None:  # the upstream may have been paid: book the worst case
                await self.service.settle(ticket.reservation, ticket.reservation.dollars, ticket.reservation.tokens)
                ticket.reservation = None
            self._count(ticket, 500)
            raise internal_error() from None
        finally:
            if not handed_off:
                self._end(ticket)

    def _begin(self, ticket: Ticket, rt: Runtime) -> None:
        """A request starts: it holds its runtime (a reload closes that runtime only after it ends)."""
        ticket.rt = rt
        rt.users += 1
        self.service.metrics.in_flight.inc()

    def _end(self, ticket: Ticket) -> None:
        ticket.rt.users -= 1
        self.service.metrics.in_flight.dec()

    # -- plan -----------------------------------------------------------------------------------
    def plan(self, rt: Runtime, call: ApiCall, caller: Caller, target: Target) -> Plan:
        tier = caller.tier
        if target.kind == "route":
            if call.endpoint != "chat":
                raise invalid(f"`{target.name}` is a routed model: it serves /v1/chat/completions only.", param="model")
            if call.n != 1:
                raise invalid(f"'n' must be 1 for the routed model `{target.name}`: the gateway chooses how many "
                              "completions to draw and returns the best one.", param="n")
            route = rt.settings.route(target.name)
            return self._route_plan(rt, call, tier, target, route, self.service.arm_for(route, tier, rt),
                                    caller.key_caps)
        upstream = rt.upstreams[target.name]
        body = {**call.body, "model": upstream.config.wire_model}
        limited = _limit_if_bounded(call.endpoint, body, tier, rt, caller.key_caps)
        b = bound(call.endpoint, body, rt.settings.limits.default_max_tokens)
        n = b.completions
        if tier.max_n is not None and n > tier.max_n:
            raise invalid(f"This request asks for {n} completions; your tier `{tier.name}` allows at most "
                          f"{tier.max_n}.", param="n", code="n_above_tier_limit")
        worst, tokens = upstream.worst_case(b)
        if tier.max_cost_per_request is not None and worst * n > tier.max_cost_per_request + 1e-12:
            raise invalid(f"This request could cost up to ${worst * n:.4f} ({n} completion(s) of its prompt and "
                          f"token limit at `{target.name}`'s price), more than your tier's max_cost_per_request "
                          f"of ${tier.max_cost_per_request}. Lower the token limit or n.",
                          code="request_cost_above_limit")
        return Plan(target, upstream, body, n, worst, tokens, limited=limited, bound=b, completion_worst=worst)

    def _route_plan(self, rt: Runtime, call: ApiCall, tier, target: Target, route, arm: Arm,
                    key_caps: dict | None = None) -> Plan:
        upstream = rt.upstreams[route.upstream]
        body, overridden = apply_arm(route, arm.prompt_id, call.body, OWNED_ON_ROUTES)
        body["model"] = upstream.config.wire_model
        limited = _limit_if_bounded("chat", body, tier, rt, key_caps)
        worst, completion_worst, tokens, b = rt.route_worst_case(route, body)
        n = clamp_n(arm.n, route_n_max=route.n_max, tier_max_n=tier.max_n,
                    max_cost_per_request=tier.max_cost_per_request, worst_cost_per_completion=worst)
        return Plan(target, upstream, body, n, worst, tokens, route, arm, overridden, limited, b, completion_worst)

    def _fallbacks(self, rt: Runtime, call: ApiCall, ticket: Ticket) -> list[Plan]:
        """`degrade` on a route with a published ranking: the tier's ranked arms, best first, each as it
        would be served to this request (an arm this request cannot be served at its N is skipped)."""
        plan, tier = ticket.plan, ticket.caller.tier
        plans = []
        for ranked in self.service.policy.alternatives(plan.route.model, tier.name):
            if ranked.arm == plan.arm or not any(p.id == ranked.prompt_id for p in plan.route.prompts):
                continue
            alt = self._route_plan(rt, call, tier, plan.target, plan.route, ranked.arm, ticket.caller.key_caps)
            if alt.n == ranked.n:
                plans.append(alt)
        return plans

    async def reserve(self, rt: Runtime, ticket: Ticket, call: ApiCall) -> None:
        """Book the worst case under every cap of the caller's tier and key: 429, 503, or (degrade) the
        best ranked arm that fits (another prompt, or fewer completions when nothing is ranked)."""
        plan, caller = ticket.plan, ticket.caller
        caps = rt.caps(caller.tier, caller.key_id, caller.key_caps)
        if not caps:
            return
        svc = self.service
        scoring = rt.scorers[plan.route.model].timeout if plan.route is not None and plan.route.model in rt.scorers else 0
        degrade = plan.route is not None and caller.tier.on_exhausted == "degrade"
        fallbacks = self._fallbacks(rt, call, ticket) if degrade else []
        holding = max(_holding_s(p, caller.tier, scoring) for p in [plan, *fallbacks])  # whichever is booked
        expires = time.time() + holding + rt.settings.store.reservation_grace_seconds
        where = dict(owner=svc.instance_id, expires_at=expires, reservation_id=ticket.record.id)
        try:
            if fallbacks:
                options = [plan, *fallbacks]
                index, reservation = await svc.reserve_first(
                    caps, [(p.n, p.worst_dollars, p.worst_tokens) for p in options], **where)
                ticket.plan = options[index]
            else:
                reservation = await svc.reserve(caps, plan.n, plan.worst_dollars, plan.worst_tokens,
                                                allow_fewer=degrade, **where)
        except BudgetExhausted as exc:
            svc.metrics.budget_rejections.labels(caller.tier.name, f"{exc.cap.scope.split(':')[0]}:{exc.cap.window}").inc()
            raise GatewayError(429, f"Budget exhausted: {exc}.", type="insufficient_quota", code="budget_exhausted",
                               headers={"retry-after": str(max(1, int(exc.reset - time.time()) + 1))}) from None
        except StoreUnavailable as exc:
            raise store_unavailable(f"The spend ledger cannot be written ({exc}); nothing was sent upstream.") from None
        if reservation.n < plan.n or ticket.plan is not plan:
            svc.metrics.budget_degradations.labels(ticket.route_label, caller.tier.name).inc()
            ticket.plan.n = reservation.n
            ticket.degraded = True
        ticket.reservation = reservation

    def _describe(self, ticket: Ticket, call: ApiCall) -> None:
        plan, record = ticket.plan, ticket.record
        record.upstream = plan.upstream.name
        record.n = plan.n
        record.messages = json.dumps(call.messages or call.body.get("input") or call.body.get("prompt"),
                                     ensure_ascii=False)
        record.query_key = query_key(call.messages or call.body.get("input") or call.body.get("prompt"))
        if plan.route is not None:
            rt = self.service.rt
            record.kind, record.route, record.aggregator = "serve", plan.route.model, plan.route.aggregator
            record.prompt_id = plan.arm.prompt_id
            record.prompt_version = rt.prompt_versions.get((plan.route.model, plan.arm.prompt_id))
            record.policy_version = self.service.policy.version

    # -- routes ---------------------------------------------------------------------------------
    async def _serve_route(self, rt: Runtime, call: ApiCall, ticket: Ticket, relay: Relay | None = None) -> Outcome:
        """Draw N, choose one, settle (completions and judge calls), log and count; the `chat.completion`."""
        plan, record = ticket.plan, ticket.record
        draw, choice = Draw([]), None
        try:
            judged = await self._draw(rt, plan, ticket.caller.tier, record, draw, relay)
            completions = self._price_unknown(draw.completions, plan)
            ticket.upstream_s = max((c.latency_s for c in completions), default=0.0)
            record.upstream_id = ",".join(draw.upstream_ids)[:500] or None
            ok = [c for c in completions if not c.error]
            if not ok:
                err = self._all_failed(completions, plan.n)
                await self._settle(ticket, completions)
                await self._finish(ticket, err.status, completions, error=err.message)
                raise err
            choice = await choose(rt, plan.route, ticket.caller.tier, plan.body["messages"], completions,
                                  self.service.rng, answers=judged if isinstance(judged, list) else None,
                                  scored=judged if isinstance(judged, WaveScores) else None)
        finally:
            await self._settle(ticket, draw.completions, choice)
        record.chosen_index, record.chosen_answer = choice.index, choice.info.get("answer")
        record.tie_size, record.vote_share = choice.info.get("tie_size"), choice.info.get("vote_share")
        usage = usage_of(completions, draw.usage_details)
        iapo = {"route": plan.route.model, "tier": ticket.caller.tier.name, "prompt_id": plan.arm.prompt_id,
                "n": plan.n, "aggregator": plan.route.aggregator, "policy_version": record.policy_version,
                "failed": len(completions) - len(ok),
                **({"waves": record.waves, "completions": len(completions)} if record.waves else {}),
                "cost": float(sum(c.cost for c in completions)) + choice.scoring.dollars,
                "scores": choice.quality, **choice.info}
        extra = {"iapo": iapo, **({"service_tier": draw.service_tier} if draw.service_tier else {})}
        body = chat_completion(request_id=record.id, created=int(record.created), model=plan.route.model,
                               completion=completions[choice.index], usage=usage,
                               system_fingerprint=draw.system_fingerprint, extra=extra)
        status = 499 if relay is not None and relay.client_gone else 200
        logged = await self._finish(ticket, status, completions, choice=choice)
        return Outcome(200, body, self._headers(ticket, logged))

    async def _draw(self, rt: Runtime, plan: Plan, tier, record: RequestRecord, draw: Draw,
                    relay: Relay | None = None) -> list | WaveScores | None:
        """The arm's N in one call, or, on a tier with `adaptive`, in waves until the vote is settled
        (majority vote) or a completion's weighted score reaches the tier's threshold (best-of-N); the
        reservation covers all N, settle books what was drawn. Fills `draw` in place, so waves already
        paid for are settled even if a later one is interrupted; returns what the waves were judged by
        (the answers, or the scores), for the choice; None when drawn at once."""
        sequential = sequential_plan(plan, tier)
        if sequential is None:
            draw.extend(await plan.upstream.draw(plan.body, plan.n))
            return None
        waves, rule = sequential
        if plan.route.aggregator == "bon":
            scored = WaveScores(rt.scorers[plan.route.model].names)
            weights = np.asarray(rt.weights(plan.route, tier), dtype=float)

            async def judge(completions: list[Completion], drawn: int) -> bool:
                if relay is not None and relay.client_gone:
                    return True  # nobody is waiting: do not pay judges for this wave
                scores = await scored.add(rt, plan.route, plan.body["messages"], completions)
                return scores is None or reached(scores @ weights, drawn, plan.n, rule)

            await self._in_waves(plan, record, draw, relay, waves, judge)
            return scored
        extract = rt.extractors[plan.route.model]
        answers: list = []

        async def vote(completions: list[Completion], drawn: int) -> bool:
            answers.extend(answer_of(c.message, extract) if not c.error else None for c in completions)
            return settled(answers, drawn, plan.n, rule)

        await self._in_waves(plan, record, draw, relay, waves, vote)
        return answers

    @staticmethod
    async def _in_waves(plan: Plan, record: RequestRecord, draw: Draw, relay: Relay | None, waves: Waves,
                        judge) -> None:
        """Draw the plan's N wave by wave into `draw`; after each wave `judge(completions, drawn)` says
        whether the request is done. A wave that fails entirely, or a client that has gone, ends it too:
        do not pay for more waves."""
        drawn = 0
        for record.waves, end in enumerate(waves.ends(plan.n), 1):
            body = plan.body
            if drawn and isinstance(body.get("seed"), int):  # a seeded provider would repeat wave 1's answers
                body = {**body, "seed": body["seed"] + drawn}
            part = await plan.upstream.draw(body, int(end) - drawn)
            draw.extend(part)
            drawn = int(end)
            if await judge(part.completions, drawn) or all(c.error for c in part.completions) \
                    or (relay is not None and relay.client_gone):
                break

    def _price_unknown(self, completions: list[Completion], plan: Plan) -> list[Completion]:
        """Completions the provider may have billed without saying how much (no usage, or a timeout after
        the request was sent) are booked at their worst case: a cap must never trust silence."""
        for c in completions:
            if c.unpriced or c.error_kind == "timeout":
                c.cost, c.prompt_tokens, c.completion_tokens = (plan.completion_worst, plan.bound.prompt_tokens,
                                                                plan.bound.completion_tokens)
        return completions

    def _all_failed(self, completions: list[Completion], n: int) -> GatewayError:
        kinds = sorted({c.error_kind or "other" for c in completions})
        if kinds == ["bad_request"]:  # the upstream refused the request itself (e.g. too long): the caller's to fix
            return GatewayError(400, f"The upstream model rejected the request: {completions[0].error}",
                                code="upstream_rejected")
        return upstream_failed(f"The upstream model failed for all {n} completions ({', '.join(kinds)}).")

    # -- passthrough ----------------------------------------------------------------------------
    async def _forward(self, call: ApiCall, ticket: Ticket) -> Outcome:
        """The body as the caller sent it (model mapped), the provider's answer as it came back."""
        plan = ticket.plan
        try:
            reply, ticket.upstream_s = await plan.upstream.call(call.endpoint, plan.body)
        except UpstreamError as err:
            sent = [Completion(None, error=str(err), error_kind=err.kind)] if err.kind == "timeout" else []
            sent = self._price_unknown(sent, plan)
            await self._settle(ticket, sent)
            mapped = _mapped(err)
            await self._finish(ticket, mapped.status, sent, error=str(err))
            raise mapped from None
        served_by = plan.upstream.served_by(reply)
        completions = _forwarded(call.endpoint, reply.body, served_by, tokens_of(call.endpoint, reply.body),
                                 ticket.upstream_s)
        completions = self._price_unknown(completions, plan)
        ticket.record.upstream_id = reply.body.get("id") if isinstance(reply.body.get("id"), str) else None
        await self._settle(ticket, completions)
        logged = await self._finish(ticket, 200, completions)
        return Outcome(200, reply.raw, self._headers(ticket, logged))

    # -- streams --------------------------------------------------------------------------------
    async def _stream(self, rt: Runtime, call: ApiCall, ticket: Ticket) -> Outcome:
        """Start the producer task; once the upstream has accepted (or, for N > 1, at once) answer 200
        with the relay's events. A failure before that is an ordinary error status."""
        relay = Relay(rt.settings.limits.stream_keepalive_seconds)
        plan = ticket.plan
        if plan.route is not None and plan.n > 1:
            producer = self._stream_chosen(rt, call, ticket, relay)
            relay.open()
        else:
            producer = self._relay_upstream(call, ticket, relay)
        self.service.track(asyncio.ensure_future(producer))
        await relay.opened  # raises the GatewayError of a stream that failed before it started
        headers = {**self._headers(ticket, None), "cache-control": "no-cache"}
        return Outcome(200, None, headers, relay.body())

    async def _stream_chosen(self, rt: Runtime, call: ApiCall, ticket: Ticket, relay: Relay) -> None:
        """N > 1: draw and choose (keep-alives meanwhile), then the chosen completion as chunks."""
        try:
            outcome = await self._serve_route(rt, call, ticket, relay)
            if outcome.headers.get("x-iapo-logged") == "pending":
                relay.put(LOGGED_PENDING)
            for chunk in chat_chunks(outcome.body, include_usage=call.include_usage):
                relay.put(chunk)
        except GatewayError as err:
            relay.put(sse_error(err))
        except Exception:
            log.exception("unexpected error serving a streamed routed request")
            relay.put(sse_error(GatewayError(500, "The gateway failed to serve this request.", type="server_error")))
            self._count(ticket, 500)
        finally:
            relay.close()
            self._end(ticket)

    async def _relay_upstream(self, call: ApiCall, ticket: Ticket, relay: Relay) -> None:
        """Passthrough, or a route at N = 1: the provider's events as they arrive, usage from its last one."""
        plan, record = ticket.plan, ticket.record
        routed = plan.route is not None
        body = {**plan.body, "stream": True}
        asked_usage = call.include_usage
        if call.endpoint in ("chat", "completions"):
            body["stream_options"] = {**(call.body.get("stream_options") or {}), "include_usage": True}
        builder, texts, tokens, status = MessageBuilder(), [], None, 200
        start = time.monotonic()
        ending = b""  # [DONE] goes out once the request is logged: acknowledged means logged, for streams too
        try:
            async with plan.upstream.stream(call.endpoint, body) as events:
                relay.open()
                async for event in events:
                    data = event.data
                    if event.done:
                        ending = event.raw
                        continue
                    tokens = tokens_of(call.endpoint, data) or tokens
                    if call.endpoint == "chat" and data is not None:
                        builder.add(data)
                    elif data is not None:
                        texts.append(_event_text(call.endpoint, data))
                    if is_usage_only(data) and not asked_usage:
                        continue
                    if routed and data is not None and not event.done:
                        relay.put(sse(self._routed_chunk(data, ticket)))
                    else:
                        relay.put(event.raw)
        except UpstreamError as err:
            mapped = _mapped(err)
            status = mapped.status
            if not relay.opened.done():
                relay.open(mapped)
            else:
                relay.put(sse_error(mapped))
            record.error = str(err)
        except Exception as exc:  # never leave the handler waiting, whatever broke
            log.exception("unexpected error relaying a stream")
            status = 500
            relay.open(GatewayError(500, "The gateway failed to serve this request.", type="server_error"))
            record.error = repr(exc)[:300]
        finally:
            ticket.upstream_s = time.monotonic() - start
            try:
                completions = self._streamed(call.endpoint, builder, texts, tokens, plan, ticket, status,
                                             relay.opened.done() and relay.opened.exception() is None)
                await self._settle(ticket, completions)
                if relay.client_gone and status == 200:
                    status = 499  # the client closed the connection before the end (nginx's code)
                choice = None
                if routed and plan.route.aggregator == "mv" and completions and not completions[0].error:
                    # N = 1: nothing to choose; the vote answer is recorded (feedback scores it). A BoN route's
                    # scorers are not called for one streamed completion, so the stream's end is not held up.
                    choice = await choose(self.service.rt, plan.route, ticket.caller.tier, plan.body["messages"],
                                          completions, self.service.rng)
                    record.chosen_index, record.chosen_answer = 0, choice.info.get("answer")
                if await self._finish(ticket, status, completions, choice=choice, error=record.error) is False:
                    relay.put(LOGGED_PENDING)
            finally:
                if ending:
                    relay.put(ending)
                relay.close()
                self._end(ticket)

    def _routed_chunk(self, data: dict, ticket: Ticket) -> dict:
        """A provider chunk as the route's: our id and model name; the `iapo` object on the finishing chunk."""
        chunk = {**data, "id": ticket.record.id, "model": ticket.plan.route.model}
        if any(c.get("finish_reason") for c in data.get("choices") or []):
            chunk["iapo"] = {"route": ticket.plan.route.model, "tier": ticket.caller.tier.name,
                             "prompt_id": ticket.plan.arm.prompt_id, "n": 1, "aggregator": ticket.plan.route.aggregator,
                             "policy_version": ticket.record.policy_version}
        return chunk

    def _streamed(self, endpoint: str, builder: MessageBuilder, texts: list[str], tokens, plan: Plan,
                  ticket: Ticket, status: int, started: bool) -> list[Completion]:
        """The completion a stream formed, priced from its usage; a stream that started and ended without
        usage (the provider sent none, or it broke) is booked at its worst case."""
        prompt, completion = tokens or (0, 0)
        served_by = plan.upstream
        if endpoint == "chat":
            message = builder.message()
            ticket.record.upstream_id = builder.upstream_id
            done = Completion(message, builder.finish_reason, None, prompt, completion, served_by.price(prompt, completion),
                              ticket.upstream_s, error=ticket.record.error if status not in (200, 499) else None)
        else:
            done = Completion({"role": "assistant", "content": "".join(texts)}, None, None, prompt, completion,
                              served_by.price(prompt, completion), ticket.upstream_s)
        if tokens is None and not started:
            return []  # refused before the first event: nothing was generated
        if tokens is None:
            log.warning("a stream from upstream %s ended without usage; booking its worst case", plan.upstream.name)
            done.unpriced = True
        return self._price_unknown([done], plan)

    # -- settle, log, count ---------------------------------------------------------------------
    async def _settle(self, ticket: Ticket, completions: list[Completion], choice: Choice | None = None) -> None:
        """Book what the request really cost (completions and judge calls) and release its reservation."""
        if ticket.reservation is None:
            return
        reservation, ticket.reservation = ticket.reservation, None
        dollars = float(sum(c.cost for c in completions)) + (choice.scoring.dollars if choice else 0.0)
        tokens = sum(c.prompt_tokens + c.completion_tokens for c in completions) + (choice.scoring.tokens if choice else 0)
        await self.service.settle(reservation, dollars, tokens)

    async def _finish(self, ticket: Ticket, status: int, completions: list[Completion], *,
                      choice: Choice | None = None, error: str | None = None) -> bool | None:
        """Log the request with its completions and count it; True when its rows are committed."""
        record = ticket.record
        record.status, record.error = status, error
        record.latency_s = time.perf_counter() - ticket.started
        record.upstream_latency_s = ticket.upstream_s
        record.add_usage(completions)
        if choice is not None:
            record.cost += choice.scoring.dollars
        logged = await self.service.log(request_log(record, completions, choice.answers if choice else None,
                                                    choice.scores if choice else None))
        self._count(ticket, status, completions, choice)
        return logged

    def _count(self, ticket: Ticket, status: int, completions: list[Completion] | None = None,
               choice: Choice | None = None) -> None:
        if ticket.counted:
            return
        ticket.counted = True
        m = self.service.metrics
        record = ticket.record
        tier = record.tier or "-"
        route = ticket.route_label
        prompt = ticket.plan.arm.prompt_id if ticket.plan is not None and ticket.plan.arm else "-"
        n = str(ticket.plan.n) if ticket.plan is not None else "-"
        m.requests.labels(route, tier, prompt, n, str(status), record.endpoint).inc()
        m.latency.labels(route, tier).observe(record.latency_s or (time.perf_counter() - ticket.started))
        if ticket.plan is not None:
            m.upstream_latency.labels(ticket.plan.upstream.name).observe(ticket.upstream_s)
        if not completions:
            return
        drawn = sum(1 for c in completions if not c.error)
        m.completions.labels(route, tier, "serve").inc(drawn)
        if drawn < len(completions):
            m.failed_completions.labels(route, tier).inc(len(completions) - drawn)
        m.tokens.labels(route, tier, "prompt").inc(record.prompt_tokens)
        m.tokens.labels(route, tier, "completion").inc(record.completion_tokens)
        m.cost.labels(route, tier, "serve").inc(record.cost)
        if record.waves:
            m.waves.labels(route, tier).observe(record.waves)
            m.completions_saved.labels(route, tier).inc(max(ticket.plan.n - len(completions), 0))
        if choice is not None and status in (200, 499):
            for name, value in choice.quality.items():
                m.quality.labels(route, tier, name).observe(value)
            route_cfg = ticket.plan.route
            if route_cfg is not None and route_cfg.aggregator == "bon" and choice.quality:
                w = self.service.rt.weights(route_cfg, ticket.caller.tier)
                names = self.service.rt.scorers[route_cfg.model].names
                m.utility.labels(route, tier).observe(
                    float(sum(wi * choice.quality[o] for wi, o in zip(w, names))) - ticket.caller.tier.cost_weight * record.cost)

    def _headers(self, ticket: Ticket, logged: bool | None) -> dict[str, str]:
        plan = ticket.plan
        headers = {"x-iapo-request-id": ticket.record.id}
        if plan.route is not None:
            headers.update({"x-iapo-prompt": plan.arm.prompt_id, "x-iapo-n": str(plan.n),
                            "x-iapo-policy-version": str(ticket.record.policy_version)})
            if plan.overridden:
                headers["x-iapo-overridden"] = ",".join(plan.overridden)
            if ticket.degraded:
                headers["x-iapo-degraded"] = "budget"
            if ticket.record.waves:
                headers["x-iapo-waves"] = str(ticket.record.waves)
        if plan.limited:
            headers["x-iapo-limited"] = f"{plan.limited}={plan.body[plan.limited]}"
        if logged is False:
            headers["x-iapo-logged"] = "pending"  # the store is failing: the rows wait in memory, not on disk
        overhead = max(0.0, (time.perf_counter() - ticket.started - ticket.upstream_s) * 1000)
        headers["x-iapo-overhead-ms"] = f"{overhead:.2f}"
        return headers


def sequential_plan(plan: Plan, tier) -> tuple[Waves, StoppingRule | float] | None:
    """How an adaptive tier draws this plan's N (N > 1): its waves, and on majority-vote routes the rule
    of the arm (a learned policy's) or of the tier's config, on best-of-N routes the tier's score
    threshold; None to draw all N at once."""
    adaptive = tier.adaptive
    if adaptive is None or plan.route is None or plan.n == 1:
        return None
    if plan.route.aggregator == "bon":
        return (adaptive.waves, adaptive.threshold) if adaptive.threshold is not None else None
    rule = adaptive.stopping_rule
    if plan.arm is not None and plan.arm.stop:
        try:
            rule = StoppingRule.parse(plan.arm.stop)
        except ValueError:  # a policy from a newer version: serve it as the tier's config says
            log.warning("unknown stopping rule %r in the policy for %s; using the tier's", plan.arm.stop,
                        plan.route.model)
    return (adaptive.waves, rule) if rule is not None else None  # `learned` with a fixed arm, `never`: all N at once


def _holding_s(plan: Plan, tier, scoring_s: float) -> float:
    """The longest a plan can hold its reservation: its upstream's deadline and the scoring time, once
    per wave on an adaptive tier (each wave calls, and on best-of-N scores, again)."""
    sequential = sequential_plan(plan, tier)
    return (plan.upstream.deadline_s + scoring_s) * (len(sequential[0].ends(plan.n)) if sequential else 1)


def _limit_if_bounded(endpoint: str, body: dict, tier, rt: Runtime, key_caps: dict | None) -> str | None:
    """On a tier (or key) with caps or a cost cap, a request that sets no token limit gets the default
    one, so what is reserved is a real bound; returns the field added."""
    bounded = tier.caps or tier.key_caps or key_caps or tier.max_cost_per_request is not None
    if not bounded or endpoint == "embeddings" or token_limit(endpoint, body) is not None:
        return None
    field_name = INJECTED_LIMIT_FIELD[endpoint]
    body[field_name] = rt.settings.limits.default_max_tokens
    return field_name


def _mapped(err: UpstreamError) -> GatewayError:
    """A provider's failure as the caller sees it: its own 4xx as it is; rate limits as 429; a full
    gateway queue as 503; the rest 502."""
    if err.kind in ("bad_request", "not_found") and err.status is not None:
        return UpstreamRejected(err.status, err.body, f"The upstream model rejected the request: {err}")
    if err.kind == "busy":
        return GatewayError(503, f"The gateway's connections to this upstream are all busy: {err}",
                            type="server_error", code="upstream_busy", headers={"retry-after": "1"})
    if err.kind == "rate_limit":
        return GatewayError(429, f"The upstream model is rate-limiting this gateway: {err}", type="rate_limit_error",
                            code="upstream_rate_limited", headers={"retry-after": str(int(err.retry_after or 1))})
    return upstream_failed(f"The upstream model failed: {err}")


def _forwarded(endpoint: str, body: dict, upstream: UpstreamClient, tokens, seconds: float) -> list[Completion]:
    """A forwarded answer as completions for the log: one per choice, the usage split over them."""
    prompt, completion = tokens or (0, 0)
    if endpoint == "chat":
        return upstream.split(body, seconds, max(1, len(body.get("choices") or []))).completions
    if endpoint == "completions":
        choices = body.get("choices") or [{}]
        outputs = [{"role": "assistant", "content": c.get("text")} for c in choices]
    elif endpoint == "responses":
        outputs = [{"role": "assistant", "content": _response_text(body)}]
    else:
        outputs = [None]
    share = [completion // len(outputs)] * len(outputs)
    share[0] += completion - sum(share)
    return [Completion(o, None, None, prompt if i == 0 else 0, c, upstream.price(prompt if i == 0 else 0, c), seconds)
            for i, (o, c) in enumerate(zip(outputs, share))]


def _response_text(body: dict) -> str:
    return "".join(part.get("text") or "" for item in body.get("output") or [] if isinstance(item, dict)
                   for part in item.get("content") or [] if isinstance(part, dict))


def _event_text(endpoint: str, data: dict) -> str:
    if endpoint == "completions":
        return "".join(c.get("text") or "" for c in data.get("choices") or [] if c.get("index", 0) == 0)
    if endpoint == "responses" and data.get("type") == "response.output_text.delta":
        return data.get("delta") or ""
    return ""
