"""One writer thread drains a bounded queue and inserts in batches, off the request path."""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field

from store.database import open_database, write_transaction

log = logging.getLogger("iapo.store")


@dataclass
class RequestLog:
    """A request and its completions: written together in one transaction."""

    request: dict
    completions: list[dict] = field(default_factory=list)


@dataclass
class FeedbackLog:
    feedback: dict


_STOP = object()


class LogWriter:
    """Bounded queue + single writer thread; `close()` flushes everything already accepted."""

    def __init__(self, path: str, *, max_queue: int = 10_000, batch_size: int = 256) -> None:
        self.path = path
        self.batch_size = batch_size
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="iapo-log-writer", daemon=True)
        self._flushed = threading.Condition()
        self._written = 0
        self._accepted = 0
        self.errors = 0
        self._thread.start()

    @property
    def written(self) -> int:
        return self._written

    def depth(self) -> int:
        return self._queue.qsize()

    async def submit(self, item: RequestLog | FeedbackLog) -> None:
        """Enqueue without blocking the event loop; waits in a thread only when the queue is full."""
        self._accepted += 1
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            await asyncio.to_thread(self._queue.put, item)

    def submit_blocking(self, item: RequestLog | FeedbackLog) -> None:
        self._accepted += 1
        self._queue.put(item)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything accepted so far is written."""
        target = self._accepted
        with self._flushed:
            return self._flushed.wait_for(lambda: self._written >= target, timeout=timeout)

    async def aflush(self, timeout: float = 10.0) -> bool:
        return await asyncio.to_thread(self.flush, timeout)

    def close(self, timeout: float = 30.0) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        db = open_database(self.path)
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            while len(batch) < self.batch_size:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if any(item is _STOP for item in batch):
                stopping = True
                batch = [item for item in batch if item is not _STOP]
                while True:  # drain what arrived before the stop
                    try:
                        extra = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if extra is not _STOP:
                        batch.append(extra)
            if batch:
                self._write(db, batch)
        db.conn.close()

    def _write(self, db, batch: list) -> None:
        requests = [i.request for i in batch if isinstance(i, RequestLog)]
        completions = [c for i in batch if isinstance(i, RequestLog) for c in i.completions]
        feedback = [i.feedback for i in batch if isinstance(i, FeedbackLog)]
        try:
            with write_transaction(db):
                if requests:
                    db["requests"].insert_all(requests, replace=True)
                if completions:
                    db["completions"].insert_all(completions, replace=True)
                if feedback:
                    db["feedback"].insert_all(feedback)
        except Exception:  # a bad batch must not kill the writer; count it and go on
            self.errors += 1
            log.exception("log writer failed on a batch of %d items", len(batch))
        with self._flushed:
            self._written += len(batch)
            self._flushed.notify_all()
