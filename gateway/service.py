"""The long-lived gateway: start and stop, config reload, policy watch, scheduled training, and the
store's housekeeping (expired reservations, settles that failed). Requests go through `Pipeline`."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

from gateway.config import ConfigError, Route, Settings, Tier, load_config
from gateway.errors import store_unavailable
from gateway.metrics import GatewayMetrics
from gateway.pipeline import Pipeline
from gateway.runtime import Runtime
from gateway.access import Access
from gateway.upstream import UPSTREAM_ERROR_KINDS
from policies.arms import Arm, Policy
from store.database import open_database
from store.errors import StoreUnavailable
from store.keys import KeyStore
from store.policy_store import PolicyStore
from store.spend import Reservation, SpendLedger
from store.writer import LogWriter, RequestLog

log = logging.getLogger("iapo.gateway")
HOUSEKEEPING_SECONDS = 5.0
MAX_DEFERRED_SETTLES = 100_000


class GatewayService:
    """The running gateway: the current Runtime (config-derived), policy, writer, ledger, metrics."""

    def __init__(self, settings: Settings, config_path: str | None = None) -> None:
        self.config_path = config_path
        self.metrics = GatewayMetrics()
        self.rng = np.random.default_rng(settings.seed)
        self.policy = Policy()
        self._initial = settings
        self.rt: Runtime | None = None
        self.writer: LogWriter | None = None
        self.pipeline = Pipeline(self)
        self.instance_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._background: list[asyncio.Task] = []
        self._streams: set[asyncio.Task] = set()
        self._retired: list[tuple[Runtime, set]] = []  # replaced runtimes, closed once no request uses them
        self._closing: set[asyncio.Task] = set()
        self._deferred: list[tuple[Reservation, float, int]] = []
        self._config_mtime = _mtime(config_path)

    @property
    def settings(self) -> Settings:
        return self.rt.settings if self.rt else self._initial

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        s = self._initial
        self.loop = asyncio.get_running_loop()
        self.http = httpx.AsyncClient(limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
        self.rt = self._build_runtime(s)
        await asyncio.to_thread(self.rt.prepare)
        self.db = open_database(s.store.url)
        self.policies = PolicyStore(self.db)
        # the ledger's transactions run on one thread of their own: a slow or locked store never stalls the loop
        self.ledger = SpendLedger(open_database(s.store.url))
        self._ledger_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="iapo-ledger")
        self.access = Access(KeyStore(open_database(s.store.url)))
        # the spend gauges read through a connection of their own, in the thread that renders /metrics
        self.metrics.attach_ledger(SpendLedger(open_database(s.store.url)), lambda: self.settings)
        self.writer = LogWriter(s.store.url, max_queue=s.store.queue_size, batch_size=s.store.batch_size)
        released = await self._in_ledger_thread(self._release_expired)
        if released:
            log.info("released %d expired reservation(s) left by an earlier process", released)
        self._reload_policy()
        self._background.append(asyncio.create_task(self._watch()))
        self._background.append(asyncio.create_task(self._housekeeping()))
        if s.train.interval_seconds:
            self._background.append(asyncio.create_task(self._train_periodically()))
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):  # not the main thread, or no SIGHUP
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._reload_soon)

    async def stop(self) -> None:
        for task in self._background:
            task.cancel()
        if self._streams:  # streams whose clients left are still being read, settled and logged
            deadline = max((u.deadline_s for u in self.rt.upstreams.values()), default=30.0)
            n_max = max((r.n_max for r in self.settings.routes), default=1)
            calls = max((len(t.adaptive.waves.ends(n_max))
                         for t in self.settings.tiers if t.adaptive is not None), default=1)  # adaptive: a call per wave
            await asyncio.wait(set(self._streams), timeout=deadline * calls)
        await self._in_ledger_thread(self._settle_deferred)
        self._ledger_thread.shutdown(wait=True)
        if self.writer:
            await asyncio.to_thread(self.writer.close)
        await self.http.aclose()
        for old, keep in self._retired:
            await old.aclose(keep)
        await self.rt.aclose()
        self.db.close()

    def track(self, task: asyncio.Task) -> None:
        """Keep a stream's producer alive past its request (and let stop() wait for it)."""
        self._streams.add(task)
        task.add_done_callback(self._streams.discard)

    def _build_runtime(self, settings: Settings, reuse: dict | None = None) -> Runtime:
        for name in settings.upstreams:  # export zeros, so rates and alerts exist before the first error
            for kind in UPSTREAM_ERROR_KINDS:
                self.metrics.upstream_errors.labels(name, kind)
        return Runtime.build(settings, self.http, reuse=reuse,
                             on_upstream_error=lambda up, kind: self.metrics.upstream_errors.labels(up, kind).inc())

    def _reload_soon(self) -> None:
        task = asyncio.ensure_future(self.reload())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def reload(self) -> bool:
        """Re-read the config file; a valid one replaces the Runtime between requests, an invalid one is
        refused (logged and counted) and the old one keeps serving. Building runs off the event loop."""
        if not self.config_path:
            return False
        old = self.rt
        try:
            settings = await asyncio.to_thread(load_config, self.config_path)
            if settings.store.url != self.settings.store.url:
                raise ConfigError("store.url cannot change while serving; restart to move the store")
            runtime = self._build_runtime(settings, reuse=old.upstreams)
            await asyncio.to_thread(runtime.prepare)
        except ConfigError as exc:
            log.error("config reload rejected, keeping the running config: %s", exc)
            self.metrics.config_reloads.labels("error").inc()
            self.metrics.config_ok.set(0)
            return False
        self.rt = runtime
        self._retired.append((old, set(runtime.upstreams.values())))  # closed once its last request ends
        self.access.clear()
        self.metrics.config_reloads.labels("ok").inc()
        self.metrics.config_ok.set(1)
        log.info("config reloaded from %s", self.config_path)
        return True

    async def _close_retired(self) -> None:
        for entry in [e for e in self._retired if e[0].users <= 0]:
            self._retired.remove(entry)
            await entry[0].aclose(entry[1])

    # -- policy ---------------------------------------------------------------------------------
    def arm_for(self, route: Route, tier: Tier, rt: Runtime | None = None) -> Arm:
        """The published arm of (route, tier), else the configured start arm."""
        arm = self.policy.arm_for(route.model, tier.name)
        if arm is not None and any(p.id == arm.prompt_id for p in route.prompts):
            return arm
        return (rt or self.rt).start_arm(route, tier.name)

    def _reload_policy(self) -> None:
        version = self.policies.latest_version()
        if version != self.policy.version:
            self.policy = self.policies.load(version)
            log.info("serving policy version %d", version)
        self.metrics.policy_version.set(self.policy.version)

    # -- the store, as the pipeline needs it ----------------------------------------------------
    def require_store(self) -> None:
        """Refuse (503) before any upstream call when the log could not take this request's rows."""
        if not self.writer.admits(self.settings.store.on_write_failure):
            raise store_unavailable(f"The request log cannot be written ({self.writer.last_error or 'queue full'}); "
                                    "nothing was sent upstream. Retry shortly.")

    async def _in_ledger_thread(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._ledger_thread,
                                                                functools.partial(fn, *args, **kwargs))

    async def reserve(self, *args, **kwargs) -> Reservation:
        """`SpendLedger.reserve` on the ledger's thread (BudgetExhausted and StoreUnavailable pass through)."""
        return await self._in_ledger_thread(self.ledger.reserve, *args, **kwargs)

    async def reserve_first(self, *args, **kwargs) -> tuple[int, Reservation]:
        """`SpendLedger.reserve_first` on the ledger's thread."""
        return await self._in_ledger_thread(self.ledger.reserve_first, *args, **kwargs)

    async def settle(self, reservation: Reservation, dollars: float, tokens: int) -> None:
        """Book real spend; if the ledger cannot be written now, keep the settle and retry it (the
        reservation meanwhile holds the room until it expires)."""
        try:
            await self._in_ledger_thread(self.ledger.settle, reservation, dollars, tokens)
        except RuntimeError:  # the ledger's thread is gone (a stream outlived shutdown): settle here
            self.ledger.settle(reservation, dollars, tokens)
        except StoreUnavailable as exc:
            log.warning("settle deferred (%s): $%.6f, %d tokens", exc, dollars, tokens)
            if len(self._deferred) < MAX_DEFERRED_SETTLES:
                self._deferred.append((reservation, dollars, tokens))
            else:
                log.error("too many deferred settles (%d): $%.6f of spend is not booked; its reservation holds "
                          "the room until it expires", MAX_DEFERRED_SETTLES, dollars)
            self.metrics.deferred_settles.set(len(self._deferred))

    async def log(self, item: RequestLog) -> bool | None:
        """Queue a request's rows; with `store.ack: after_commit`, wait (boundedly) for their commit.
        True: committed. False: still queued (the store is failing). None: not waited for."""
        store = self.settings.store
        if store.ack == "after_commit" and self.writer.state == "failing":
            await self.writer.submit(item)  # no commit is coming soon: say so now instead of after ack_timeout
            return False
        if store.ack == "after_commit":
            return await self.writer.submit(item, wait=True, timeout=store.ack_timeout)
        await self.writer.submit(item)
        return None

    def serving(self) -> bool:
        """Whether new requests are admitted now (what a readiness probe should follow): the store is
        writing, or `buffer` still has room."""
        return self.writer.admits(self.settings.store.on_write_failure)

    def store_health(self) -> dict:
        w = self.writer
        return {"state": w.state, "queue": w.depth(), "oldest_queued_s": round(w.oldest_age(), 3),
                "write_errors": w.write_errors, "last_error": w.last_error, "deferred_settles": len(self._deferred)}

    def _release_expired(self) -> int:
        try:
            released = self.ledger.release_expired()
        except StoreUnavailable as exc:
            log.warning("could not release expired reservations: %s", exc)
            return 0
        if released:
            self.metrics.reservations_released.inc(released)
        return released

    def _settle_deferred(self) -> None:
        pending, self._deferred = self._deferred, []
        for reservation, dollars, tokens in pending:
            try:
                self.ledger.settle(reservation, dollars, tokens)
            except StoreUnavailable:
                self._deferred.append((reservation, dollars, tokens))
        self.metrics.deferred_settles.set(len(self._deferred))

    def observe_store(self) -> None:
        w = self.writer
        self.metrics.log_queue.set(w.depth())
        self.metrics.store_up.set(1 if w.state == "ok" else 0)
        self.metrics.log_oldest.set(w.oldest_age())

    # -- background -----------------------------------------------------------------------------
    async def _watch(self) -> None:
        """Between requests: switch to a newly published policy; reload a changed config file."""
        while True:
            await asyncio.sleep(self.settings.store.policy_poll_seconds)
            try:
                self.observe_store()
                self._reload_policy()
                mtime = _mtime(self.config_path)
                if mtime != self._config_mtime:
                    self._config_mtime = mtime
                    await self.reload()
            except Exception:
                log.exception("watcher step failed; serving continues on policy version %d", self.policy.version)

    async def _housekeeping(self) -> None:
        """Release reservations past their expiry (a crashed process's) and retry deferred settles."""
        while True:
            await asyncio.sleep(HOUSEKEEPING_SECONDS)
            try:
                await self._in_ledger_thread(self._release_expired)
                await self._in_ledger_thread(self.ledger.prune)
                if self._deferred:
                    await self._in_ledger_thread(self._settle_deferred)
                await self._close_retired()
            except Exception:
                log.exception("store housekeeping failed; it runs again in %.0f s", HOUSEKEEPING_SECONDS)

    async def _train_periodically(self) -> None:
        """`train.interval_seconds`: re-learn every route on the serving runtime (so training takes at most
        `train.max_share` of each upstream's concurrency, next to serving), in this event loop."""
        from gateway.trainer import train_routes

        while True:
            await asyncio.sleep(self.settings.train.interval_seconds)
            try:
                for r in await train_routes(self.settings, rt=self.rt):
                    log.info("training %s: %s%s%s", r.route, r.status, f" (version {r.version})" if r.version else "",
                             f": {r.message}" if r.message else "")
            except Exception:
                log.exception("scheduled training failed; serving continues on version %d", self.policy.version)


def _mtime(path: str | None) -> float | None:
    try:
        return os.stat(path).st_mtime if path else None
    except OSError:
        return None
