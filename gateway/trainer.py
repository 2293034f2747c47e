"""The closed loop as a library: re-learn a route's policy with PSST on logged queries, through the
same runtime that serves (upstream clients, scorers, extractors, weights), and publish it.

Each PSST round is one batch of upstream calls, under `train.concurrency` and at most `train.max_share`
of the upstream's concurrency; every exploration pull is logged (kind='explore', its position in the
run) as it completes, so a run killed part-way resumes under its id and replays what it paid for.
Served requests with the same prompt version are offered as free pulls. Candidates are only arms each
tier can be served (its max_n and cost cap at the worst case); the result is published atomically
with each tier's ranked arms, or not at all. Returns reports; prints nothing.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Callable

import httpx
import numpy as np

from gateway.batch_jobs import FINAL, BatchClient, BatchUnsupported
from gateway.config import Route, Settings
from gateway.transports import UpstreamError
from gateway.prompting import apply_arm
from gateway.records import RequestRecord, completion_rows
from gateway.runtime import Runtime
from gateway.upstream import Completion
from policies.aggregate import answer_of
from policies.arms import Arm, RankedArm
from policies.budget import clamp_n
from policies.pooled import PooledEstimates
from policies.psst import PLAN_VERSION, PSST, Context, Outcome, TopK
from policies.stopping import SequentialChoice, best_sequential, learned_rules
from store.database import open_database
from store.policy_store import PolicyEntry, PolicyStore
from store.queries import served_pulls, training_queries
from store.spend import SpendLedger
from store.training_lock import LEASE_S, TrainingLock, TrainingLockHeld
from store.training_runs import LoggedPull, TrainingBatches, TrainingRun, TrainingRuns
from store.writer import LogWriter, RequestLog

log = logging.getLogger("iapo.train")


class TrainingRefused(Exception):
    """The route cannot be trained as configured (no gold, too few queries, lock held, no such route)."""


class TrainingFault(Exception):
    """An upstream, verifier or scorer failure during exploration; the run ends unpublished."""


class TrainingWaiting(Exception):
    """Batch mode: a round's batch job is still running; the next `iapo train` picks the run up there."""


@dataclass
class TierChange:
    tier: str
    old: Arm
    new: Arm
    old_value: float
    new_value: float
    new_se: float
    ranked: list[RankedArm] = field(default_factory=list)


@dataclass
class RoundProgress:
    route: str
    round: int
    completions: int
    budget: int
    dollars: float


@dataclass
class TrainingReport:
    route: str
    run_id: str
    status: str  # published | partial | unpublished | aborted | refused | dry-run
    message: str = ""
    version: int | None = None
    budget: int = 0
    completions: int = 0
    dollars: float = 0.0
    saved_completions: int = 0
    resumed: bool = False
    replayed_completions: int = 0  # paid for by the killed run this one resumed, not bought again
    queries: int = 0
    rounds: list[dict] = field(default_factory=list)
    changes: list[TierChange] = field(default_factory=list)
    feasible: dict[str, dict[str, int]] = field(default_factory=dict)
    sequential: dict[str, dict] = field(default_factory=dict)  # tiers that took a learned sequential arm
    # per tier, after each round: (prompt, N, estimated value) of the arm the engine would choose then
    trajectory: dict[str, list] = field(default_factory=dict)
    # per tier, the estimated value at each feasible N of its best few prompts (value-versus-N curves)
    curves: dict[str, dict[str, list]] = field(default_factory=dict)
    wall_s: float = 0.0


def contexts_for(rt: Runtime, route: Route) -> dict[str, Context]:
    """Each tier is a context: its weights over the route's objectives (as serving weighs them) and its λ."""
    return {t.name: Context(tuple(float(w) for w in rt.weights(route, t)), t.cost_weight) for t in rt.settings.tiers}


class RouteTrainer:
    def __init__(self, rt: Runtime, route: Route, *, budget: int | None = None, max_dollars: float | None = None,
                 on_progress: Callable[[RoundProgress], None] | None = None, writer: LogWriter | None = None) -> None:
        self.rt, self.route = rt, route
        self.settings = rt.settings
        self.config = self.settings.train
        self.budget = budget or self.config.budget
        self.max_dollars = max_dollars if max_dollars is not None else self.config.max_dollars
        self.on_progress = on_progress
        self.extract = rt.extractors[route.model]
        self.upstream = rt.upstreams[route.upstream]
        self.scorer = rt.scorers.get(route.model)
        self.prompt_versions = {p.id: rt.prompt_versions[(route.model, p.id)] for p in route.prompts}
        share = max(1, math.floor(self.config.max_share * self.upstream.config.max_concurrency))
        self.slots = asyncio.Semaphore(min(self.config.concurrency, share))
        self._writer = writer

    async def run(self, *, dry_run: bool = False, publish_partial: bool = False, resume: bool = True) -> TrainingReport:
        start = time.monotonic()
        report = TrainingReport(self.route.model, f"train-{uuid.uuid4().hex[:12]}", "aborted", budget=self.budget)
        db = open_database(self.settings.store.url)
        lock = TrainingLock(open_database(self.settings.store.url), self.route.model, report.run_id)  # renewed from a thread
        runs = TrainingRuns(db)
        self.run_row: TrainingRun | None = None
        locked = False
        renewing = None
        try:
            if not dry_run:
                try:
                    lock.acquire()
                    locked = True
                except TrainingLockHeld as exc:
                    report.status, report.message = "refused", str(exc)
                    return report
                renewing = asyncio.ensure_future(_keep_leased(lock))
            await self._run(db, runs, report, dry_run=dry_run, publish_partial=publish_partial, resume=resume)
        except TrainingRefused as exc:
            report.status, report.message = "refused", str(exc)
        except TrainingFault as exc:
            report.status, report.message = "aborted", f"{exc}; the serving policy is unchanged (the pulls paid " \
                                                       "for are logged: the next run resumes from them)"
        except TrainingWaiting as exc:
            report.status, report.message = "waiting", str(exc)
        finally:
            if renewing is not None:
                renewing.cancel()
            if self.run_row is not None:
                runs.finish(self.run_row.run_id, report.status, {
                    "completions": report.completions, "dollars": report.dollars, "version": report.version,
                    "message": report.message, "replayed_completions": report.replayed_completions,
                    "saved_completions": report.saved_completions, "trajectory": report.trajectory,
                    "curves": report.curves, "sequential": report.sequential, "changes": [
                        {"tier": c.tier, "old": [c.old.prompt_id, c.old.n], "new": [c.new.prompt_id, c.new.n],
                         "stop": c.new.stop,
                         "old_value": _num(c.old_value), "new_value": _num(c.new_value), "new_se": _num(c.new_se)}
                        for c in report.changes]})
            if locked:
                lock.release()
            lock.db.close()
            db.close()
            report.wall_s = time.monotonic() - start
        return report

    # -- the run --------------------------------------------------------------------------------
    async def _run(self, db, runs: TrainingRuns, report: TrainingReport, *, dry_run: bool, publish_partial: bool,
                   resume: bool) -> None:
        route, cfg = self.route, self.config
        run = runs.unfinished(route.model) if resume and not dry_run else None
        queries = run.queries if run is not None else await self._fresh_queries(db)
        if len(queries) < cfg.min_queries:
            raise TrainingRefused(f"route {route.model!r} has {len(queries)} usable training queries in the window; "
                                  f"train.min_queries is {cfg.min_queries}")
        report.queries = len(queries)
        report.feasible = self._feasible(queries)
        fingerprint = self._fingerprint(report.feasible)
        engine = PSST(prompts=[p.id for p in route.prompts], n_max=route.n_max, contexts=contexts_for(self.rt, route),
                      budget=self.budget, aggregator=route.aggregator, seed=cfg.seed,
                      query_keys=[q["query_key"] for q in queries],
                      screening=TopK(cfg.screening_k, cfg.screening_fraction) if cfg.screening_k else None,
                      estimator=cfg.estimator, pull_size=cfg.pull_size, feasible=report.feasible)
        if dry_run:
            self._plan(engine, queries, report)
            return
        if run is not None and run.fingerprint == fingerprint:
            report.run_id, report.resumed = run.run_id, True
            logged = runs.logged_pulls(run.run_id)
            log.info("resuming training run %s of %s: %d pulls already logged", run.run_id, route.model, len(logged))
        else:
            if run is not None:  # settings changed since: its pulls answer another question
                runs.finish(run.run_id, "abandoned", {"message": "settings changed before it could resume"})
            run = TrainingRun(report.run_id, route.model, "running", time.time(), fingerprint, self.budget, queries)
            runs.begin(run)
            logged = {}
        self.run_row = run
        if cfg.reuse_served:
            report.saved_completions = await self._offer_served(engine, queries, until=run.started)
        await self._explore(db, runs, engine, queries, logged, report)
        self._publish(db, engine, report, publish_partial)

    async def _fresh_queries(self, db) -> list[dict]:
        since = time.time() - self.config.window_hours * 3600
        queries = await asyncio.to_thread(_read, self.settings.store.url, training_queries, self.route.model,
                                          since=since, limit=self.config.max_queries)
        if self.route.aggregator == "mv":
            queries = await self._with_gold(queries)
        return sorted(queries, key=lambda q: q["query_key"])  # a stable order: query slots mean the same queries

    def _feasible(self, queries: list[dict]) -> dict[str, dict[str, int]]:
        """Per tier and prompt, the largest N it can be served: the tier's max_n, and its cost cap at the
        worst case of the longest training query (serving computes the same bound per request)."""
        longest = max(queries, key=lambda q: len(json.dumps(q["messages"])))["messages"] if queries else []
        worst = {p.id: self.rt.route_worst_case(self.route, self._body(p.id, longest or [{"role": "user", "content": ""}]))[0]
                 for p in self.route.prompts}
        return {t.name: {p: clamp_n(self.route.n_max, route_n_max=self.route.n_max, tier_max_n=t.max_n,
                                    max_cost_per_request=t.max_cost_per_request, worst_cost_per_completion=w)
                         for p, w in worst.items()}
                for t in self.settings.tiers}

    def _fingerprint(self, feasible: dict) -> str:
        """What a run's pulls depend on: resume only a run with the same settings and engine plan version."""
        cfg = self.config
        parts = [PLAN_VERSION, self.route.model, self.route.aggregator, self.route.n_max,
                 sorted(self.prompt_versions.items()), self.budget, cfg.seed, cfg.estimator, cfg.pull_size,
                 cfg.screening_k, cfg.screening_fraction, cfg.mode,
                 feasible, {k: list(c.weights) + [c.cost_weight] for k, c in contexts_for(self.rt, self.route).items()}]
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    async def _with_gold(self, queries: list[dict]) -> list[dict]:
        """MV needs gold: feedback's, else the route's verifier; queries without either are dropped."""
        missing = [q for q in queries if q["gold"] is None]
        if missing and self.route.verifier is None:
            if all(q["gold"] is None for q in queries):
                raise TrainingRefused(f"route {self.route.model!r} has no gold answers: send feedback with 'gold' "
                                      "or configure a verifier")
            return [q for q in queries if q["gold"] is not None]
        if missing:
            verifier = self.route.verifier
            async with httpx.AsyncClient() as http:
                async def verify(q):
                    async with self.slots:
                        r = await http.post(verifier.url, json={"messages": q["messages"]}, timeout=verifier.timeout)
                        r.raise_for_status()
                        gold = r.json().get("gold")
                        q["gold"] = self.rt.gold(self.route.model, gold) if gold is not None else None

                try:
                    await asyncio.gather(*(verify(q) for q in missing))
                except (httpx.HTTPError, ValueError) as exc:
                    raise TrainingFault(f"verifier failed: {exc}") from None
        return [q for q in queries if q["gold"] is not None]

    async def _offer_served(self, engine: PSST, queries: list[dict], *, until: float) -> int:
        """Served requests on a training query with the current prompt version, up to the run's start,
        are free pulls (the same ones again when the run resumes)."""
        gold = {q["query_key"]: q["gold"] for q in queries}
        since = until - self.config.window_hours * 3600
        served = await asyncio.to_thread(_read, self.settings.store.url, served_pulls, self.route.model,
                                         since=since, until=until)
        pulls = []
        for r in served:
            if r["query_key"] not in gold or self.prompt_versions.get(r["prompt_id"]) != r["prompt_version"]:
                continue
            if self.route.aggregator == "mv":
                outcome = Outcome(costs=np.array(r["costs"]), answers=r["answers"], gold=gold[r["query_key"]],
                                  query=r["query_key"])
            elif all(s is not None for s in r["scores"]):
                outcome = Outcome(costs=np.array(r["costs"]), scores=np.array(r["scores"], dtype=float),
                                  query=r["query_key"])
            else:
                continue
            pulls.append((r["prompt_id"], len(r["costs"]), outcome))
        engine.offer(pulls)
        return sum(n for _, n, _ in pulls)

    def _plan(self, engine: PSST, queries: list[dict], report: TrainingReport) -> None:
        """Dry run: walk the schedule with empty outcomes; cost at each prompt's worst case."""
        longest = max(queries, key=lambda q: len(json.dumps(q["messages"])))["messages"]
        worst = {p.id: self.rt.route_worst_case(self.route, self._body(p.id, longest))[0] for p in self.route.prompts}
        K = max(1, len(self.route.objectives))
        while batch := engine.ask():
            report.rounds.append({"pulls": len(batch), "completions": sum(n for _, n in batch),
                                  "worst_dollars": sum(worst[p] * n for p, n in batch)})
            engine.tell([(p, n, Outcome(costs=np.zeros(n), answers=[None] * n, gold=None, scores=np.zeros((n, K))))
                         for p, n in batch])
        report.completions = sum(r["completions"] for r in report.rounds)
        report.dollars = sum(r["worst_dollars"] for r in report.rounds)
        report.status = "dry-run"

    # -- exploration ----------------------------------------------------------------------------
    async def _explore(self, db, runs: TrainingRuns, engine: PSST, queries: list[dict],
                       logged: dict[int, LoggedPull], report: TrainingReport) -> None:
        ledger = SpendLedger(open_database(self.settings.store.url))
        writer = self._writer or LogWriter(self.settings.store.url)
        self._ledger_lock = asyncio.Lock()
        seq = 0
        round_no = 0
        try:
            while batch := engine.ask():
                round_no += 1
                told, to_buy = [], []
                for pull in batch:
                    q = queries[pull.query if pull.query is not None else int(engine.rng.integers(len(queries)))]
                    body = self._body(pull[0], q["messages"])
                    if self.config.pull_seeds and "seed" not in body:
                        body["seed"] = _pull_seed(self.config.seed, seq)
                    done = logged.get(seq)
                    if done is not None and (done.prompt_id, done.n, done.query_key) == (pull[0], pull[1], q["query_key"]) \
                            and not done.errors:
                        told.append((pull, self._outcome_of(done, q)))
                        report.replayed_completions += pull[1]
                    else:
                        cost = self.rt.route_worst_case(self.route, body)[0] * pull[1] * self._price_factor
                        to_buy.append((seq, pull, q, body, cost))
                    seq += 1
                report.dollars += sum(float(np.sum(o.costs)) for _, o in told) * self._price_factor
                if self.max_dollars is not None and to_buy:
                    room = self.max_dollars - report.dollars
                    fits = np.cumsum([item[-1] for item in to_buy]) <= room + 1e-12
                    if not fits.all():
                        to_buy = [item for item, ok in zip(to_buy, fits) if ok]
                        report.status, report.message = "partial", f"dollar cap ${self.max_dollars} reached"
                if self.config.mode == "batch" and to_buy:
                    bought = await self._batch_round(db, writer, ledger, report.run_id, round_no, to_buy)
                else:
                    results = await asyncio.gather(*(self._pull(writer, ledger, report.run_id, *item[:4])
                                                     for item in to_buy),
                                                   return_exceptions=True)  # every pull that was paid for gets logged
                    failures = [r for r in results if isinstance(r, BaseException)]
                    if failures:
                        raise failures[0]
                    bought = list(results)
                told += bought
                engine.tell([(pull[0], pull[1], outcome) for pull, outcome in told])
                report.completions += sum(pull[1] for pull, _ in told)
                report.dollars += sum(float(np.sum(o.costs)) for _, o in bought) * self._price_factor  # as billed
                report.rounds.append({"pulls": len(told), "completions": sum(p[1] for p, _ in told),
                                      "replayed": sum(1 for p, _ in told) - len(bought)})
                for tier, (prompt_id, n) in engine.policy().items():
                    report.trajectory.setdefault(tier, []).append(
                        [report.completions, prompt_id, n, _num(engine.estimate(tier, prompt_id, n)[0])])
                await asyncio.to_thread(runs.progress, report.run_id, report.completions, report.dollars)
                if self.on_progress:
                    self.on_progress(RoundProgress(self.route.model, len(report.rounds), report.completions,
                                                   self.budget, report.dollars))
                if report.status == "partial":
                    break
        finally:
            if self._writer is None:
                await asyncio.to_thread(writer.close)
            ledger.db.close()

    def _curves(self, engine: PSST, feasible: dict[str, dict[str, int]], top: int = 3) -> dict[str, dict[str, list]]:
        values = np.asarray(engine.estimates.mean(), dtype=float)  # (contexts, prompts, N)
        return {tier: _top_curves(values[c], engine.prompts,
                                  np.array([feasible[tier][p] for p in engine.prompts]), top)
                for c, tier in enumerate(engine.context_names)}

    def _body(self, prompt_id: str, messages: list[dict]) -> dict:
        body, _ = apply_arm(self.route, prompt_id, {"messages": messages}, ("messages",))
        body["model"] = self.upstream.config.wire_model
        return body

    @property
    def _price_factor(self) -> float:
        """Batch jobs are billed at the upstream's batch discount."""
        return self.upstream.config.batch_discount if self.config.mode == "batch" else 1.0

    async def _batch_round(self, db, writer: LogWriter, ledger: SpendLedger, run_id: str, round_no: int,
                           to_buy: list) -> list:
        """The round's pulls as one provider batch job (or the job an earlier invocation submitted for it);
        TrainingWaiting while it runs past `train.batch_wait_seconds`. Whatever a final batch answered is
        logged (an expired or cancelled batch still bills what it finished); pulls without an answer
        end the invocation, and the next one buys only those, in a new batch."""
        batches = TrainingBatches(db)
        known = batches.of(run_id, round_no)
        try:
            async with BatchClient(self.upstream) as client:
                tag = {"iapo_run": run_id, "iapo_round": str(round_no)}
                # a batch submitted by an invocation that died before recording its id is found by its tag
                adopted = await client.find(tag) if known is None else None
                if adopted is not None:
                    batch_id = adopted
                    batches.submitted(run_id, round_no, batch_id, len(to_buy))
                elif known is None or known["status"] in ("failed", "expired", "cancelled", "consumed"):
                    requests = [(f"{run_id}:{seq}", {**body, "n": pull[1]} if pull[1] > 1 else body)
                                for seq, pull, _, body, _ in to_buy]
                    batch_id = await client.submit(requests, tag)
                    batches.submitted(run_id, round_no, batch_id, len(requests))
                else:
                    batch_id = known["batch_id"]
                batch = await client.wait(batch_id, poll_s=self.config.batch_poll_seconds,
                                          timeout_s=self.config.batch_wait_seconds)
                status = batch.get("status")
                if status not in FINAL:
                    raise TrainingWaiting(f"batch {batch_id} (round {round_no}, {len(to_buy)} pulls) is "
                                          f"{status}; run iapo train again to continue this run")
                answers = await client.results(batch)
        except (BatchUnsupported, UpstreamError) as exc:
            raise TrainingFault(f"batch exploration: {exc}") from None
        bought, missing = [], []
        for seq, pull, query, body, _ in to_buy:
            data = answers.get(f"{run_id}:{seq}")
            if not isinstance(data, dict) or "error" in data or not data.get("choices"):
                missing.append(seq)
                continue
            completions = self.upstream.split(data, 0.0, pull[1]).completions  # a batch answers where it was sent
            if len(completions) < pull[1]:
                missing.append(seq)  # fewer choices than asked (a provider that ignores n): bought again
                continue
            bought.append(await self._record_pull(writer, ledger, run_id, seq, pull, query, body, completions))
        batches.status(run_id, round_no, "completed" if status == "completed" and not missing else "consumed")
        if missing:
            raise TrainingFault(f"batch {batch_id} of round {round_no} ended {status} with {len(missing)} of "
                                f"{len(to_buy)} pulls unanswered; the {len(bought)} answered are logged, and the "
                                "next `iapo train` buys the rest")
        return bought

    async def _pull(self, writer: LogWriter, ledger: SpendLedger, run_id: str, seq: int, pull, query: dict, body: dict):
        """Buy one pull, score it, and log it before it is told: what was paid for is never lost."""
        async with self.slots:
            completions = (await self.upstream.draw(body, pull[1])).completions
        return await self._record_pull(writer, ledger, run_id, seq, pull, query, body, completions)

    async def _record_pull(self, writer: LogWriter, ledger: SpendLedger, run_id: str, seq: int, pull, query: dict,
                           body: dict, completions: list[Completion]):
        prompt_id, n = pull[0], pull[1]
        failed = [c for c in completions if c.error]
        if failed:
            raise TrainingFault(f"upstream failed during exploration ({failed[0].error_kind}: {failed[0].error})")
        answers, scores = await self._judge(body["messages"], completions)
        # the engine values arms at the price they are served at; the log and the ledger book what was paid
        costs = np.array([c.cost for c in completions])
        for c in completions:
            c.cost *= self._price_factor
        record = RequestRecord(id=f"explore-{uuid.uuid4().hex}", created=time.time(), kind="explore",
                               route=self.route.model, upstream=self.route.upstream, prompt_id=prompt_id,
                               prompt_version=self.prompt_versions[prompt_id], n=n,
                               aggregator=self.route.aggregator, messages=json.dumps(query["messages"], ensure_ascii=False),
                               query_key=query["query_key"], status=200, run_id=run_id, run_pull=seq)
        record.add_usage(completions)
        await writer.submit(RequestLog(asdict(record), completion_rows(record.id, completions, answers, scores)),
                            wait=True, timeout=60)
        async with self._ledger_lock:
            await asyncio.to_thread(ledger.record, f"explore:{self.route.model}", ("per_day", "per_month"),
                                    record.cost, record.prompt_tokens + record.completion_tokens)
        if self.route.aggregator == "mv":
            return pull, Outcome(costs=costs, answers=answers, gold=query["gold"], query=query["query_key"])
        return pull, Outcome(costs=costs, scores=scores, query=query["query_key"])

    async def _judge(self, messages: list[dict], completions: list[Completion]):
        if self.route.aggregator == "mv":
            return [answer_of(c.message, self.extract) for c in completions], None
        try:
            return [None] * len(completions), await self.scorer.score(messages, [c.message for c in completions])
        except Exception as exc:
            raise TrainingFault(f"scoring failed during exploration: {exc}") from None

    def _outcome_of(self, pull: LoggedPull, query: dict) -> Outcome:
        costs = np.array(pull.costs, dtype=float) / self._price_factor  # back to the serving price
        if self.route.aggregator == "mv":
            return Outcome(costs=costs, answers=pull.answers, gold=query["gold"], query=query["query_key"])
        return Outcome(costs=costs, scores=np.array(pull.scores, dtype=float), query=query["query_key"])

    # -- publishing -----------------------------------------------------------------------------
    def _sequential(self, engine: PSST, tier: str, prompt_id: str, n: int, fixed_value: float,
                    report: TrainingReport) -> SequentialChoice | None:
        """On a majority-vote route and a tier with `adaptive: {rule: learned}`: the chosen prompt's best
        sequential arm (waves of the tier's config, N_max within what the tier can be served) when its
        plug-in value, from the engine's pooled answer counts, is at least the fixed arm's on the same
        counts (less the tier's tolerance)."""
        adaptive = self.settings.tier(tier).adaptive
        estimates = engine.estimates
        if self.route.aggregator != "mv" or adaptive is None or adaptive.rule != "learned" \
                or not isinstance(estimates, PooledEstimates) or not np.isfinite(fixed_value):
            return None
        p = engine.prompt_index[prompt_id]
        return best_sequential(*estimates.answer_counts(p), float(estimates.cost_per_completion()[p]),
                               contexts_for(self.rt, self.route)[tier].cost_weight, n, report.feasible[tier][prompt_id],
                               adaptive.waves, learned_rules(adaptive.risk), tolerance=adaptive.tolerance)

    def _publish(self, db, engine: PSST, report: TrainingReport, publish_partial: bool) -> None:
        route = self.route
        old = PolicyStore(db).load()
        for tier, (prompt_id, n) in engine.policy().items():
            prev = old.arm_for(route.model, tier) or self.rt.start_arm(route, tier)
            new_value, new_se = engine.estimate(tier, prompt_id, n)
            old_value = engine.estimate(tier, prev.prompt_id, min(prev.n, route.n_max))[0] \
                if prev.prompt_id in engine.prompt_index else float("nan")
            ranked = list(engine.ranked(tier))
            arm, sequential = Arm(prompt_id, n), self._sequential(engine, tier, prompt_id, n, new_value, report)
            if sequential is not None:  # the tier lets training choose: a sequential arm beat the fixed one
                # the engine's value of the fixed arm plus the sequential arm's gain over it on the
                # plug-in counts (the engine's own estimate may be shrunk: not comparable as it is)
                arm = Arm(prompt_id, sequential.n_max, str(sequential.rule))
                new_value += sequential.utility - sequential.fixed_utility
                report.sequential[tier] = asdict(sequential) | {"rule": str(sequential.rule), "fixed_n": n}
            report.changes.append(TierChange(tier, prev, arm, old_value, new_value, new_se, ranked))
        report.curves = self._curves(engine, report.feasible)
        complete = engine.finished and report.status != "partial"
        if not (complete or publish_partial):
            report.status = "unpublished"
            return
        entries = [PolicyEntry(route.model, c.tier, c.new, _num(c.new_value), _num(c.new_se), report.completions,
                               tuple(c.ranked)) for c in report.changes]
        report.version = PolicyStore(db).publish(entries, run_id=report.run_id,
                                                 note=f"iapo train {route.model}" + ("" if complete else " (partial)"))
        report.status = "published" if complete else "partial"


def _top_curves(values: np.ndarray, prompts: list[str], limit: np.ndarray, top: int) -> dict[str, list]:
    """The `top` prompts by their best value, each with its value at every N up to its feasible limit."""
    finite = np.where(np.isfinite(values), values, -np.inf)
    best = finite.max(axis=1)
    order = [int(p) for p in np.argsort(-best, kind="stable") if np.isfinite(best[p])][:top]
    return {prompts[p]: [_num(float(v)) for v in values[p, :int(limit[p])]] for p in order}


async def _keep_leased(lock: TrainingLock) -> None:
    """Renew the route's training lease while the run goes on (another replica takes over a lapsed one)."""
    while True:
        await asyncio.sleep(LEASE_S / 4)
        try:
            await asyncio.to_thread(lock.renew)
        except Exception:
            log.warning("could not renew the training lease of %s", lock.route, exc_info=True)


def _pull_seed(seed: int, seq: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{seq}".encode()).digest()[:4], "big") & 0x7FFFFFFF


def _read(path: str, query, *args, **kwargs):
    """A read on a connection of its own (for worker threads)."""
    db = open_database(path)
    try:
        return query(db, *args, **kwargs)
    finally:
        db.close()


def _num(x: float) -> float | None:
    return None if x is None or np.isnan(x) else float(x)


async def train_routes(settings: Settings, route: str | None = None, *, rt: Runtime | None = None,
                       **options) -> list[TrainingReport]:
    """Train every route (or one) and return their reports; with `rt`, on that runtime (the serving
    one, so upstream concurrency is shared), else on a runtime of its own built from `settings`."""
    routes = [r for r in settings.routes if route is None or r.model == route]
    if route is not None and not routes:
        raise TrainingRefused(f"no route named {route!r}; routes: {[r.model for r in settings.routes]}")
    dry_run = options.pop("dry_run", False)
    publish_partial = options.pop("publish_partial", False)
    resume = options.pop("resume", True)
    own = rt is None
    http = httpx.AsyncClient() if own else None
    rt = rt or Runtime.build(settings, http)
    try:
        return [await RouteTrainer(rt, r, **options).run(dry_run=dry_run, publish_partial=publish_partial,
                                                         resume=resume)
                for r in routes]
    finally:
        if own:
            await rt.aclose()
            await http.aclose()
