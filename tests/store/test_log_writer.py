"""The log writer never drops what it accepted: retry while the store fails, health and admission,
group commit ("acknowledged means logged"), poisoned items, close, and kill -9 after acknowledgement."""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import sqlite3
import threading
import time

import pytest

from store.writer import FeedbackLog, LogWriter, RequestLog
from store_testing import db_path, fresh_db  # noqa: F401  (fixtures)


def item(i: int, **extra) -> RequestLog:
    rid = f"r{i:05d}"
    return RequestLog({"id": rid, "created": 1000.0 + i, "kind": "serve", "route": "math", "status": 200, **extra},
                      [{"request_id": rid, "idx": k, "text": f"t{k}", "answer": str(k)} for k in range(2)])


def ids(path: str) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [r[0] for r in conn.execute("select id from requests order by rowid")]


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class Lock:
    """Another connection holding the write lock: the writer's transactions fail with "database is locked"."""

    def __init__(self, path: str) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        self.conn.execute("ROLLBACK")
        self.conn.close()


@pytest.fixture
def writer(fresh_db, db_path):
    writers = []

    def make(**kwargs) -> LogWriter:
        kwargs.setdefault("busy_timeout", 0.05)
        writers.append(LogWriter(db_path, **kwargs))
        return writers[-1]

    yield make
    for w in writers:
        w.close(timeout=5)


def test_wait_returns_after_the_row_is_visible_to_another_connection(writer, db_path):
    w = writer()

    async def main():
        acked = []
        for i in range(20):
            assert await w.submit(item(i), wait=True)
            acked.append(f"r{i:05d}")
            assert ids(db_path) == acked  # committed before the acknowledgement
        # many waiting at once share commits (group commit) and all are acknowledged
        assert all(await asyncio.gather(*(w.submit(item(i), wait=True) for i in range(20, 220))))
        assert len(ids(db_path)) == 220

    asyncio.run(main())
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("select count(*) from completions").fetchone()[0] == 440


def test_a_locked_store_loses_nothing_and_reports_its_state(writer, db_path):
    w = writer(max_queue=1000, batch_size=16)
    assert w.state == "ok" and w.admits("refuse") and w.admits("buffer")
    lock = Lock(db_path)
    for i in range(100):
        w.submit_blocking(item(i))
    assert wait_until(lambda: w.state == "failing")
    assert not w.admits("refuse") and w.admits("buffer")
    assert w.depth() == 100 and w.write_errors >= 1 and "locked" in w.last_error
    time.sleep(1.5)  # the store stays locked for a while; items keep coming
    for i in range(100, 150):
        w.submit_blocking(item(i))
    assert w.depth() == 150 and w.oldest_age() >= 1.5 and ids(db_path) == []
    errors_while_locked = w.write_errors
    assert 3 <= errors_while_locked <= 12  # retried with backoff, not in a busy loop
    lock.release()
    assert w.flush(timeout=10)
    assert ids(db_path) == [f"r{i:05d}" for i in range(150)]  # all of them, in the order accepted
    assert w.state == "ok" and w.admits("refuse") and w.depth() == 0 and w.oldest_age() == 0.0
    assert w.poisoned == 0


def test_buffer_admits_until_max_queue_and_submit_never_drops(writer, db_path):
    w = writer(max_queue=5)
    lock = Lock(db_path)
    for i in range(5):
        w.submit_blocking(item(i))
    assert not w.admits("buffer") and not w.admits("refuse")
    for i in range(5, 8):  # admitted earlier, submitted late: still accepted, never dropped
        assert w.submit_blocking(item(i))
    assert w.depth() == 8
    lock.release()
    assert w.flush(timeout=10) and len(ids(db_path)) == 8 and w.admits("buffer")
    with pytest.raises(ValueError):
        w.admits("drop")


def test_wait_times_out_while_failing_and_the_item_is_still_written(writer, db_path):
    w = writer()
    lock = Lock(db_path)

    async def submit():
        start = time.monotonic()
        acked = await w.submit(item(1), wait=True, timeout=0.3)
        return acked, time.monotonic() - start

    acked, waited = asyncio.run(submit())
    assert acked is False and 0.3 <= waited < 1.0
    lock.release()
    assert w.flush(timeout=10) and ids(db_path) == ["r00001"]


def test_a_poisoned_item_does_not_block_the_others(writer, db_path, caplog):
    w = writer()
    orphan = RequestLog({"id": "x1", "created": 1.0}, [])
    orphan_completion = RequestLog({"id": "x2", "created": 1.0}, [{"request_id": "nope", "idx": 0}])  # foreign key
    unknown_column = RequestLog({"id": "x3", "created": 1.0, "no_such_column": 1}, [])
    caplog.set_level(logging.ERROR, logger="iapo.store")

    async def main():
        return await asyncio.gather(w.submit(item(1), wait=True), w.submit(orphan_completion, wait=True),
                                    w.submit(item(2), wait=True), w.submit(unknown_column, wait=True),
                                    w.submit(orphan, wait=True), w.submit(item(3), wait=True))

    assert asyncio.run(main()) == [True, False, True, False, True, True]
    assert ids(db_path) == ["r00001", "r00002", "x1", "r00003"]
    assert w.poisoned == 2 and w.state == "ok"
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "'x2'" in messages and "'x3'" in messages


def test_close_writes_everything_accepted(db_path, fresh_db):
    w = LogWriter(db_path, batch_size=7)
    for i in range(100):
        w.submit_blocking(item(i))
    w.close()
    assert len(ids(db_path)) == 100
    assert asyncio.run(w.submit(item(200))) is False  # closed: not accepted, and said so


def test_close_retries_a_failing_store_then_gives_up_and_says_how_many(db_path, fresh_db, caplog):
    w = LogWriter(db_path, busy_timeout=0.05)
    lock = Lock(db_path)
    for i in range(10):
        w.submit_blocking(item(i))
    caplog.set_level(logging.ERROR, logger="iapo.store")
    start = time.monotonic()
    w.close(timeout=0.5)
    assert time.monotonic() - start < 3
    assert "10 accepted items not written" in caplog.text
    lock.release()


def test_close_outlasts_a_short_failure(db_path, fresh_db):
    w = LogWriter(db_path, busy_timeout=0.05)
    lock = Lock(db_path)
    for i in range(10):
        w.submit_blocking(item(i))
    threading.Timer(0.5, lock.release).start()
    w.close(timeout=10)
    assert len(ids(db_path)) == 10


def test_feedback_through_the_writer_keeps_one_row_per_target(writer, db_path):
    w = writer()
    w.submit_blocking(item(1))
    w.submit_blocking(FeedbackLog({"request_id": "r00001", "created": 1.0, "gold": "4", "score": None}))
    w.submit_blocking(FeedbackLog({"request_id": "r00001", "created": 2.0, "gold": "5", "score": 0.5,
                                   "objective": "style"}))
    assert w.flush()
    with sqlite3.connect(db_path) as conn:
        rows = conn.execute("select target, gold, score from feedback order by target").fetchall()
    assert rows == [("gold", "5", None), ("style", None, 0.5)]


def _acknowledge_then_die(path: str, queue) -> None:
    async def main():
        w = LogWriter(path)
        i = 0
        while True:
            batch = [item(k) for k in range(i, i + 5)]
            acks = await asyncio.gather(*(w.submit(b, wait=True) for b in batch))
            queue.put([b.request["id"] for b, ok in zip(batch, acks) if ok])
            i += 5

    asyncio.run(main())


def test_acknowledged_requests_survive_kill_9(db_path, fresh_db):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_acknowledge_then_die, args=(db_path, queue))
    child.start()
    acked = []
    while len(acked) < 300:
        acked += queue.get(timeout=60)
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    stored = set(ids(db_path))
    assert set(acked) <= stored
