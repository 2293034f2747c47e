"""One writer thread commits the request log in batches, off the request path; nothing accepted is dropped.

Each batch is one transaction, each request with its completions (on PostgreSQL, the rows of a batch go
in one pipelined executemany per table). SQLite runs in WAL mode with synchronous=NORMAL: a committed
transaction survives a kill -9 of the process (not a power loss); PostgreSQL's commit is durable.
`submit(item, wait=True)` returns once the transaction holding the item has committed
("acknowledged means logged"); items that gather while a commit runs share the next one (group
commit). A batch that fails because the storage fails (disk full, I/O error, locked) is kept and
retried with backoff, and later items wait behind it in order. A batch that fails for another reason
(bad data, a bug) is written item by item; an item that still fails alone is logged and counted in
`poisoned`, so it cannot block the rest.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

from store.database import open_database, write_transaction
from store.errors import is_unavailable
from store.feedback import feedback_rows, upsert_feedback

log = logging.getLogger("iapo.store")

BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 2.0
ADMISSION_POLICIES = ("refuse", "buffer")


@dataclass
class RequestLog:
    """A request and its completions: written together in one transaction."""

    request: dict
    completions: list[dict] = field(default_factory=list)


@dataclass
class FeedbackLog:
    """One feedback payload; stored as one row per target (see store.feedback)."""

    feedback: dict


@dataclass
class _Entry:
    item: RequestLog | FeedbackLog
    seq: int
    accepted: float  # time.monotonic() when submitted
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future | None = None
    outcome: bool | None = None  # True once committed, False when poisoned


def _describe(item: RequestLog | FeedbackLog) -> str:
    if isinstance(item, RequestLog):
        return f"request {item.request.get('id')!r}"
    return f"feedback for request {item.feedback.get('request_id')!r}"


def _resolve(future: asyncio.Future, outcome: bool) -> None:
    if not future.done():
        future.set_result(outcome)


class LogWriter:
    """Unbounded queue + one writer thread; `admits` applies the soft limit `max_queue` before a request
    is served, `close()` writes everything accepted (retrying up to its timeout)."""

    def __init__(self, path: str, *, max_queue: int = 10_000, batch_size: int = 256, commit_delay: float = 0.0,
                 busy_timeout: float = 30.0) -> None:
        self.path = path
        self.max_queue, self.batch_size, self.commit_delay = max_queue, batch_size, commit_delay
        self.busy_timeout = busy_timeout
        self._entries: collections.deque[_Entry] = collections.deque()
        self._cond = threading.Condition()
        self._accepted = 0  # sequence number of the last accepted entry
        self._done = 0  # entries taken off the queue (committed or poisoned), in order
        self._written = 0
        self._failing = False
        self._closing = False
        self._close_deadline = float("inf")
        self.poisoned = 0
        self.write_errors = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="iapo-log-writer", daemon=True)
        self._thread.start()

    # -- health and admission ------------------------------------------------------------------
    @property
    def written(self) -> int:
        return self._written

    @property
    def errors(self) -> int:
        """Failed write attempts (the name older callers used)."""
        return self.write_errors

    @property
    def state(self) -> str:
        """"failing" from the first failed write of the storage until a write succeeds, else "ok"."""
        return "failing" if self._failing else "ok"

    def depth(self) -> int:
        """Items accepted and not yet written (the batch being retried included)."""
        return len(self._entries)

    def oldest_age(self) -> float:
        """Seconds the oldest queued item has waited (0 when the queue is empty)."""
        with self._cond:
            return time.monotonic() - self._entries[0].accepted if self._entries else 0.0

    def admits(self, policy: str) -> bool:
        """Whether to accept a new request: "refuse" only while the store is ok and the queue below
        `max_queue`; "buffer" while the queue is below `max_queue`, failing or not."""
        if policy not in ADMISSION_POLICIES:
            raise ValueError(f"unknown admission policy {policy!r}; expected one of {ADMISSION_POLICIES}")
        if self._closing or self.depth() >= self.max_queue:
            return False
        return policy == "buffer" or not self._failing

    # -- submitting ----------------------------------------------------------------------------
    def _enqueue(self, item: RequestLog | FeedbackLog, loop=None, future=None) -> _Entry | None:
        with self._cond:
            if self._closing:
                log.error("log writer is closed: %s was not accepted", _describe(item))
                return None
            self._accepted += 1
            entry = _Entry(item, self._accepted, time.monotonic(), loop, future)
            self._entries.append(entry)
            self._cond.notify_all()
        return entry

    async def submit(self, item: RequestLog | FeedbackLog, *, wait: bool = False, timeout: float = 5.0) -> bool:
        """Queue the item (never blocks, never drops). With `wait`, return True once its transaction has
        committed, False if `timeout` passes first (it stays queued and is still written)."""
        if not wait:
            return self._enqueue(item) is not None
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if self._enqueue(item, loop, future) is None:
            return False
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            return False

    def submit_blocking(self, item: RequestLog | FeedbackLog, *, wait: bool = False, timeout: float = 5.0) -> bool:
        """`submit` for threads without an event loop."""
        entry = self._enqueue(item)
        if entry is None or not wait:
            return entry is not None
        with self._cond:
            self._cond.wait_for(lambda: entry.outcome is not None, timeout=timeout)
            return bool(entry.outcome)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything accepted so far is written (or poisoned)."""
        with self._cond:
            target = self._accepted
            return self._cond.wait_for(lambda: self._done >= target, timeout=timeout)

    async def aflush(self, timeout: float = 10.0) -> bool:
        return await asyncio.to_thread(self.flush, timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Stop accepting, write what was accepted (retrying a failing store until `timeout`), stop."""
        with self._cond:
            self._closing = True
            self._close_deadline = time.monotonic() + timeout
            self._cond.notify_all()
        self._thread.join(timeout + 1.0)
        if self._entries:
            log.error("log writer closed with %d accepted items not written (last error: %s)",
                      len(self._entries), self.last_error)

    # -- the writer thread ---------------------------------------------------------------------
    def _run(self) -> None:
        db = None
        backoff = BACKOFF_FIRST_S
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._entries or self._closing)
                if not self._entries or time.monotonic() > self._close_deadline:
                    break
                gather = self.commit_delay > 0 and not self._closing and len(self._entries) < self.batch_size
            if gather:
                time.sleep(self.commit_delay)
            try:
                if db is None:
                    db = open_database(self.path, busy_timeout=self.busy_timeout)
                ok = self._write_batch(db)
            except Exception as exc:  # opening the file failed: the storage, not an item
                self._failed(exc)
                ok = False
            if ok:
                backoff = BACKOFF_FIRST_S
                continue
            time.sleep(min(backoff, max(0.0, self._close_deadline - time.monotonic())))
            backoff = min(backoff * 2, BACKOFF_MAX_S)
        if db is not None:
            db.close()

    def _write_batch(self, db) -> bool:
        """Commit the oldest items as one batch; False when the storage failed (retry after a backoff)."""
        with self._cond:
            batch = [self._entries[i] for i in range(min(self.batch_size, len(self._entries)))]
        try:
            self._commit(db, batch)
        except Exception as exc:
            self._failed(exc)
            if is_unavailable(exc):
                return False
            return self._write_one_by_one(db, batch)
        self._finish(batch, True)
        return True

    def _write_one_by_one(self, db, batch: list[_Entry]) -> bool:
        """After a batch failed for a non-storage reason: each item alone, so one bad item cannot
        hold back the others. False when the storage fails meanwhile."""
        for entry in batch:
            try:
                self._commit(db, [entry])
            except Exception as exc:
                self._failed(exc)
                if is_unavailable(exc):
                    return False
                log.error("log writer cannot write %s (poisoned item, dropped): %r", _describe(entry.item), exc)
                self.poisoned += 1
                self._finish([entry], False)
                continue
            self._finish([entry], True)
        return True

    def _commit(self, db, batch: list[_Entry]) -> None:
        items = [e.item for e in batch]
        requests = [i.request for i in items if isinstance(i, RequestLog)]
        completions = [c for i in items if isinstance(i, RequestLog) for c in i.completions]
        feedback = [row for i in items if isinstance(i, FeedbackLog) for row in feedback_rows(i.feedback)]
        with write_transaction(db):
            if requests:
                db.insert("requests", requests, upsert=("id",))
            if completions:
                db.insert("completions", completions, upsert=("request_id", "idx"))
            if feedback:
                upsert_feedback(db, feedback)

    def _failed(self, exc: Exception) -> None:
        self.write_errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        if is_unavailable(exc):
            if not self._failing:
                log.error("log writer cannot write to %s, retrying (items are kept): %s", self.path, self.last_error)
            self._failing = True

    def _finish(self, batch: list[_Entry], committed: bool) -> None:
        """Take the batch (the queue's head) off the queue and wake whoever waits for it."""
        with self._cond:
            for entry in batch:
                assert self._entries[0] is entry
                self._entries.popleft()
                entry.outcome = committed
            self._done += len(batch)
            if committed:
                self._written += len(batch)
                if self._failing:
                    log.warning("log writer recovered: writing to %s again", self.path)
                self._failing = False
            self._cond.notify_all()
        for entry in batch:
            if entry.future is not None:
                try:
                    entry.loop.call_soon_threadsafe(_resolve, entry.future, committed)
                except RuntimeError:  # the waiter's event loop is gone
                    pass
