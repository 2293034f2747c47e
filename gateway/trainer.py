"""The closed loop: re-learn a route's policy with PSST on logged queries, through real upstream calls.

Each PSST round is one batch of upstream calls (bounded concurrency); every exploration completion is
logged (kind='explore'); served requests with the same prompt version are offered as free pulls; the
result is published as a new policy version atomically, or not at all.
"""
from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np

from gateway.config import Route, Settings
from gateway.runtime import Runtime, prompt_version
from gateway.prompting import apply_arm
from gateway.records import RequestRecord, completion_rows
from gateway.upstream import UpstreamClient
from policies.aggregate import AnswerExtractor, answer_of
from policies.arms import Arm
from policies.psst import PSST, Context, Outcome, TopK
from store.database import open_database, write_transaction
from store.policy_store import PolicyEntry, PolicyStore
from store.queries import served_pulls, training_queries
from store.spend import SpendLedger
from store.training_lock import TrainingLock, TrainingLockHeld

log = logging.getLogger("iapo.train")


class TrainingRefused(Exception):
    """The route cannot be trained as configured (no gold, too few queries, lock held)."""


class TrainingFault(Exception):
    """An upstream or scorer failure during exploration; the run ends unpublished."""


@dataclass
class TierChange:
    tier: str
    old: Arm
    new: Arm
    old_value: float
    new_value: float
    new_se: float


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
    queries: int = 0
    rounds: list[dict] = field(default_factory=list)
    changes: list[TierChange] = field(default_factory=list)
    wall_s: float = 0.0


def contexts_for(settings: Settings, route: Route) -> dict[str, Context]:
    """Each tier is a context: its weights over the route's objectives and its λ."""
    out = {}
    for tier in settings.tiers:
        if route.aggregator == "mv":
            weights = (tier.weights.get("correct", 1.0),)
        else:
            names = [o.name for o in route.objectives]
            weights = tuple(tier.weights.get(n, 0.0) for n in names) if tier.weights else tuple([1 / len(names)] * len(names))
        out[tier.name] = Context(weights, tier.cost_weight)
    return out


class Progress:
    """A one-line bar on a terminal, plain log lines otherwise."""

    def __init__(self, route: str, budget: int, stream=None) -> None:
        self.route, self.budget = route, budget
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, round_no: int, rounds: int, spent: int, dollars: float) -> None:
        if self.tty:
            width = 30
            done = int(width * spent / max(self.budget, 1))
            self.stream.write(f"\r{self.route}: [{'#' * done}{'.' * (width - done)}] round {round_no}/{rounds} "
                              f"{spent}/{self.budget} completions ${dollars:.4f}")
            self.stream.flush()
        else:
            log.info("%s: round %d/%d, %d/%d completions, $%.4f", self.route, round_no, rounds, spent, self.budget, dollars)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


class RouteTrainer:
    def __init__(self, settings: Settings, route: Route, *, budget: int | None = None,
                 max_dollars: float | None = None, progress_stream=None) -> None:
        self.settings, self.route = settings, route
        self.config = settings.train
        self.budget = budget or self.config.budget
        self.max_dollars = max_dollars if max_dollars is not None else self.config.max_dollars
        self.progress_stream = progress_stream
        self.extract = AnswerExtractor(route.extractor.pattern, route.extractor.normalize)
        self.prompt_versions = {p.id: prompt_version(route, p.id) for p in route.prompts}

    async def run(self, *, dry_run: bool = False, publish_partial: bool = False) -> TrainingReport:
        start = time.monotonic()
        run_id = f"train-{uuid.uuid4().hex[:12]}"
        report = TrainingReport(self.route.model, run_id, "aborted", budget=self.budget)
        db = open_database(self.settings.store.path)
        lock = TrainingLock(db, self.route.model, run_id)
        locked = False
        try:
            if not dry_run:
                try:
                    lock.acquire()
                    locked = True
                except TrainingLockHeld as exc:
                    report.status, report.message = "refused", str(exc)
                    return report
            await self._run(db, report, dry_run=dry_run, publish_partial=publish_partial)
        except TrainingRefused as exc:
            report.status, report.message = "refused", str(exc)
        except TrainingFault as exc:
            report.status, report.message = "aborted", f"{exc}; the serving policy is unchanged"
        finally:
            if locked:
                lock.release()
            db.conn.close()
            report.wall_s = time.monotonic() - start
        return report

    async def _run(self, db, report: TrainingReport, *, dry_run: bool, publish_partial: bool) -> None:
        route, cfg = self.route, self.config
        since = time.time() - cfg.window_hours * 3600
        queries = training_queries(db, route.model, since=since, limit=cfg.max_queries)
        self.http = httpx.AsyncClient()
        self.rt = Runtime.build(self.settings, self.http)
        try:
            if route.aggregator == "mv":
                queries = await self._with_gold(queries)
            if len(queries) < cfg.min_queries:
                raise TrainingRefused(f"route {route.model!r} has {len(queries)} usable training queries in the window; "
                                      f"train.min_queries is {cfg.min_queries}")
            report.queries = len(queries)
            contexts = contexts_for(self.settings, route)
            trainer = PSST(prompts=[p.id for p in route.prompts], n_max=route.n_max, contexts=contexts,
                           budget=self.budget, aggregator=route.aggregator, seed=cfg.seed, n_queries=len(queries),
                           screening=TopK(cfg.screening_k, cfg.screening_fraction) if cfg.screening_k else None,
                           estimator=cfg.estimator, pull_size=cfg.pull_size)
            if dry_run:
                self._plan(trainer, report)
                return
            if cfg.reuse_served:
                report.saved_completions = self._offer_served(db, trainer, queries)
            await self._explore(db, trainer, queries, report)
            policy = trainer.policy()
            old = PolicyStore(db).load()
            for tier, (prompt_id, n) in policy.items():
                start = route.start.get(tier) or route.start.get("default")
                prev = old.arm_for(route.model, tier) or (Arm(start.prompt, start.n) if start else Arm(route.prompts[0].id, 1))
                new_value, new_se = trainer.estimate(tier, prompt_id, n)
                old_value = trainer.estimate(tier, prev.prompt_id, min(prev.n, route.n_max))[0] \
                    if prev.prompt_id in trainer.prompt_index else float("nan")
                report.changes.append(TierChange(tier, prev, Arm(prompt_id, n), old_value, new_value, new_se))
            complete = trainer.finished and report.status != "partial"
            if complete or publish_partial:
                entries = [PolicyEntry(route.model, c.tier, c.new, _num(c.new_value), _num(c.new_se), report.completions)
                           for c in report.changes]
                report.version = PolicyStore(db).publish(entries, run_id=report.run_id,
                                                         note=f"iapo train {route.model}" + ("" if complete else " (partial)"))
                report.status = "published" if complete else "partial"
            else:
                report.status = "unpublished"
        finally:
            await self.rt.aclose()
            await self.http.aclose()

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
            sem = asyncio.Semaphore(self.config.concurrency)

            async def verify(q):
                async with sem:
                    r = await self.http.post(verifier.url, json={"messages": q["messages"]}, timeout=verifier.timeout)
                    r.raise_for_status()
                    gold = r.json().get("gold")
                    q["gold"] = self.extract(f"Final answer: {gold}") if gold is not None else None

            try:
                await asyncio.gather(*(verify(q) for q in missing))
            except httpx.HTTPError as exc:
                raise TrainingFault(f"verifier failed: {exc}") from None
        return [q for q in queries if q["gold"] is not None]

    def _offer_served(self, db, trainer: PSST, queries: list[dict]) -> int:
        """Served requests on a training query with the current prompt version are free pulls."""
        gold = {q["query_key"]: q["gold"] for q in queries}
        pulls = []
        since = time.time() - self.config.window_hours * 3600
        for r in served_pulls(db, self.route.model, since=since):
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
        trainer.offer(pulls)
        return sum(n for _, n, _ in pulls)

    def _plan(self, trainer: PSST, report: TrainingReport) -> None:
        """Dry run: walk the schedule with empty outcomes; cost at each prompt's worst case."""
        upstream = self.rt.upstreams[self.route.upstream]
        worst = {}
        for p in self.route.prompts:
            body = self._body(p.id, [{"role": "user", "content": ""}])
            worst[p.id] = upstream.worst_case(body["messages"], _limit(body))[0]
        K = max(1, len(self.route.objectives))
        while batch := trainer.ask():
            report.rounds.append({"pulls": len(batch), "completions": sum(n for _, n in batch),
                                  "worst_dollars": sum(worst[p] * n for p, n in batch)})
            empty = [(p, n, Outcome(costs=np.zeros(n), answers=[None] * n, gold=None, scores=np.zeros((n, K))))
                     for p, n in batch]
            trainer.tell(empty)
        report.completions = sum(r["completions"] for r in report.rounds)
        report.dollars = sum(r["worst_dollars"] for r in report.rounds)
        report.status = "dry-run"

    async def _explore(self, db, trainer: PSST, queries: list[dict], report: TrainingReport) -> None:
        route = self.route
        upstream = self.rt.upstreams[route.upstream]
        scorer = self.rt.scorers.get(route.model)
        progress = Progress(route.model, self.budget, self.progress_stream)
        sem = asyncio.Semaphore(self.config.concurrency)
        try:
            round_no = 0
            while batch := trainer.ask():
                round_no += 1
                planned = [(pull, queries[pull.query if pull.query is not None else
                                          int(trainer.rng.integers(len(queries)))]) for pull in batch]
                prepared = []
                for pull, q in planned:
                    body = self._body(pull[0], q["messages"])
                    prepared.append((pull, q, body, upstream.worst_case(body["messages"], _limit(body))[0] * pull[1]))
                if self.max_dollars is not None:
                    room = self.max_dollars - report.dollars
                    fits = np.cumsum([w for *_, w in prepared]) <= room + 1e-12
                    if not fits.all():
                        prepared = [p for p, ok in zip(prepared, fits) if ok]
                        report.status = "partial"
                        report.message = f"dollar cap ${self.max_dollars} reached"
                results = await asyncio.gather(*(self._pull(sem, upstream, scorer, *p[:3]) for p in prepared))
                self._record(db, results, report.run_id)
                trainer.tell([(pull[0], pull[1], outcome) for pull, outcome, _ in results])
                report.completions += sum(pull[1] for pull, _, _ in results)
                report.dollars += sum(float(np.sum(o.costs)) for _, o, _ in results)
                report.rounds.append({"pulls": len(results), "completions": sum(p[1] for p, _, _ in results)})
                progress.update(round_no, trainer.rounds if hasattr(trainer, "rounds") else 0, report.completions,
                                report.dollars)
                if report.status == "partial":
                    break
        finally:
            progress.close()

    def _body(self, prompt_id: str, messages: list[dict]) -> dict:
        body, _ = apply_arm(self.route, prompt_id, {"messages": messages}, ("messages",))
        body["model"] = self.rt.upstreams[self.route.upstream].config.wire_model
        return body

    async def _pull(self, sem, upstream: UpstreamClient, scorer, pull, query, body):
        prompt_id, n = pull[0], pull[1]
        messages = body["messages"]
        async with sem:
            completions = (await upstream.draw(body, n)).completions
        failed = [c for c in completions if c.error]
        if failed:
            raise TrainingFault(f"upstream failed during exploration ({failed[0].error_kind}: {failed[0].error})")
        costs = np.array([c.cost for c in completions])
        if self.route.aggregator == "mv":
            answers = [answer_of(c.message, self.extract) for c in completions]
            outcome = Outcome(costs=costs, answers=answers, gold=query["gold"], query=query["query_key"])
            scores = None
        else:
            try:
                scores = await scorer.score(messages, [c.message for c in completions])
            except Exception as exc:
                raise TrainingFault(f"scoring failed during exploration: {exc}") from None
            answers = [None] * n
            outcome = Outcome(costs=costs, scores=scores, query=query["query_key"])
        rows = (prompt_id, n, query, completions, answers, scores)
        return pull, outcome, rows

    def _record(self, db, results, run_id: str) -> None:
        """Exploration pulls go to the log like served requests (kind='explore'), one transaction per round."""
        now = time.time()
        requests, completions = [], []
        for _, _, (prompt_id, n, query, comps, answers, scores) in results:
            record = RequestRecord(
                id=f"explore-{uuid.uuid4().hex}", created=now, kind="explore", route=self.route.model,
                upstream=self.route.upstream, prompt_id=prompt_id, prompt_version=self.prompt_versions[prompt_id], n=n,
                aggregator=self.route.aggregator, messages=json.dumps(query["messages"], ensure_ascii=False),
                query_key=query["query_key"], status=200, run_id=run_id)
            record.add_usage(comps)
            requests.append(asdict(record))
            completions += completion_rows(record.id, comps, answers, scores)
        with write_transaction(db):
            db["requests"].insert_all(requests)
            db["completions"].insert_all(completions)
        SpendLedger(db).record(f"explore:{self.route.model}", ("per_day", "per_month"),
                               sum(r["cost"] for r in requests), sum(r["prompt_tokens"] + r["completion_tokens"] for r in requests))


def _limit(body: dict) -> int | None:
    return body.get("max_tokens") or body.get("max_completion_tokens")


def _num(x: float) -> float | None:
    return None if x is None or np.isnan(x) else float(x)


def summary(report: TrainingReport) -> str:
    """The end-of-run table: per tier old arm → new arm and the estimated gain."""
    lines = [f"route {report.route}: {report.status}" + (f" (version {report.version})" if report.version else "")
             + (f": {report.message}" if report.message else "")]
    if report.status == "dry-run":
        for i, r in enumerate(report.rounds, 1):
            lines.append(f"  round {i:2d}: {r['pulls']:4d} pulls, {r['completions']:6d} completions, "
                         f"≤ ${r['worst_dollars']:.4f}")
        lines.append(f"  total: {report.completions} completions of budget {report.budget}, ≤ ${report.dollars:.4f}"
                     f" on {report.queries} training queries")
        return "\n".join(lines)
    lines.append(f"  {report.queries} training queries, {report.completions}/{report.budget} completions, "
                 f"${report.dollars:.4f}, {report.saved_completions} completions reused from served traffic, "
                 f"{report.wall_s:.1f} s")
    if report.changes:
        lines.append(f"  {'tier':8s} {'old arm':>16s} -> {'new arm':16s} {'est. gain':>10s}")
        for c in report.changes:
            gain = c.new_value - c.old_value if not np.isnan(c.old_value) else float("nan")
            lines.append(f"  {c.tier:8s} {f'({c.old.prompt_id}, N={c.old.n})':>16s} -> "
                         f"{f'({c.new.prompt_id}, N={c.new.n})':16s} {gain:+10.4f}")
    return "\n".join(lines)


async def train_routes(settings: Settings, route: str | None = None, **options) -> list[TrainingReport]:
    routes = [r for r in settings.routes if route is None or r.model == route]
    if route is not None and not routes:
        raise TrainingRefused(f"no route named {route!r}")
    dry_run = options.pop("dry_run", False)
    publish_partial = options.pop("publish_partial", False)
    return [await RouteTrainer(settings, r, **options).run(dry_run=dry_run, publish_partial=publish_partial)
            for r in routes]


def run_training_cli(settings: Settings, args) -> int:
    try:
        reports = asyncio.run(train_routes(settings, args.route, budget=args.budget, dry_run=args.dry_run,
                                           publish_partial=args.publish_partial))
    except TrainingRefused as exc:
        print(f"iapo: {exc}", file=sys.stderr)
        return 2
    for report in reports:
        print(summary(report))
    ok = {"published", "dry-run"}
    return 0 if all(r.status in ok for r in reports) else 1
