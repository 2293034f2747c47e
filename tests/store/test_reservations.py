"""Reservations that cannot leak: expiry, concurrency across threads and processes, settle once,
sweeping, and a failing store surfacing as StoreUnavailable."""
from __future__ import annotations

import calendar
import multiprocessing
import os
import signal
import sqlite3
import threading

import pytest

from policies.budget import Cap, window_bounds
from store.database import open_database
from store.errors import BudgetExhausted as ErrorsBudgetExhausted, StoreError, StoreUnavailable
from store.spend import BudgetExhausted, SpendLedger
from store_testing import db_path, fresh_db  # noqa: F401  (fixtures)

T0 = calendar.timegm((2026, 3, 15, 12, 0, 0))  # mid-month, mid-day: no window edge near
DAY = Cap("tier:free", "per_day", dollars=1.0)
PER = 0.25  # dollars per completion: binary-exact sums


def ledger(path: str, **kwargs) -> SpendLedger:
    return SpendLedger(open_database(path), **kwargs)


def spend_row(db, scope: str = "tier:free", window: str = "per_day") -> tuple[float, int]:
    row = db.execute("select dollars, tokens from spend where scope = ? and window = ?", [scope, window]).fetchone()
    return row or (0.0, 0)


def test_the_old_call_form_still_works(fresh_db):
    r = SpendLedger(fresh_db).reserve([DAY], 2, PER, 10, allow_fewer=False)
    assert r.n == 2 and r.dollars == 0.5 and r.tokens == 20 and len(r.id) == 32 and r.owner == ""
    assert r.expires_at == pytest.approx(__import__("time").time() + 300, abs=5)
    assert BudgetExhausted is ErrorsBudgetExhausted and not issubclass(BudgetExhausted, StoreError)


def test_an_unsettled_reservation_stops_counting_when_it_expires(fresh_db):
    spend = SpendLedger(fresh_db)
    spend.reserve([DAY], 4, PER, 0, allow_fewer=False, owner="w1", expires_at=T0 + 10, now=T0)  # then "killed"
    with pytest.raises(BudgetExhausted) as exc:
        spend.reserve([DAY], 1, PER, 0, allow_fewer=True, now=T0 + 9.9)
    assert exc.value.spent == 1.0 and "tier:free per_day cap" in str(exc.value)
    assert spend.reserve([DAY], 4, PER, 0, allow_fewer=False, now=T0 + 10).n == 4  # expired at 10, never swept
    assert fresh_db.execute("select count(distinct id) from reservations").fetchone()[0] == 2


def test_allow_fewer_grants_what_fits_and_rejects_at_zero(fresh_db):
    spend = SpendLedger(fresh_db)
    assert spend.reserve([DAY], 3, PER, 0, allow_fewer=True, now=T0).n == 3
    with pytest.raises(BudgetExhausted):
        spend.reserve([DAY], 2, PER, 0, allow_fewer=False, now=T0)
    assert spend.reserve([DAY], 2, PER, 0, allow_fewer=True, now=T0).n == 1
    with pytest.raises(BudgetExhausted):
        spend.reserve([DAY], 2, PER, 0, allow_fewer=True, now=T0)


def test_tokens_and_several_caps_name_the_one_that_is_full(fresh_db):
    spend = SpendLedger(fresh_db)
    key = Cap("key:0123456789abcdef", "per_minute", tokens=100)
    spend.reserve([DAY, key], 1, 0.01, 80, allow_fewer=False, now=T0)
    with pytest.raises(BudgetExhausted) as exc:
        spend.reserve([DAY, key], 1, 0.01, 80, allow_fewer=False, now=T0)
    assert exc.value.cap == key and exc.value.unit == "tokens"


def test_a_reservation_killed_with_sigkill_is_released_by_expiry(db_path):
    """A real process reserves the whole cap and is killed -9 before settling."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_reserve_then_hang, args=(db_path, queue))
    child.start()
    expires_at = queue.get(timeout=60)
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    spend = ledger(db_path)
    now = expires_at - 1
    with pytest.raises(BudgetExhausted):
        spend.reserve([DAY], 1, PER, 0, allow_fewer=True, now=now)
    assert spend.reserved(now=now)[0]["dollars"] == 1.0
    assert spend.reserve([DAY], 4, PER, 0, allow_fewer=False, now=expires_at + 0.001).n == 4
    assert spend.release_expired(now=expires_at + 0.001) == 1


def _reserve_then_hang(path: str, queue) -> None:
    r = ledger(path).reserve([DAY], 4, PER, 0, allow_fewer=False, owner=f"pid:{os.getpid()}", now=T0,
                             expires_at=T0 + 60)
    queue.put(r.expires_at)
    threading.Event().wait(120)


def _reserve_until_full(path: str, go, results, settle_share: float | None) -> None:
    """Reserve (and maybe settle at a share of the worst case) until the cap refuses even one."""
    spend = ledger(path)
    go.wait(60)
    booked = []
    while True:
        try:
            r = spend.reserve([DAY], 2, PER / 8, 0, allow_fewer=True, now=T0)
        except BudgetExhausted:
            break
        if settle_share is None:
            booked.append(r.dollars)
        else:
            cost = r.dollars * settle_share
            spend.settle(r, cost, 0)
            booked.append(cost)
    results.put(sum(booked))


@pytest.mark.parametrize("settle_share", [None, 0.5])
def test_threads_and_processes_never_book_past_a_cap(db_path, settle_share):
    open_database(db_path).conn.close()
    ctx = multiprocessing.get_context("spawn")
    go, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_reserve_until_full, args=(db_path, go, results, settle_share)) for _ in range(2)]
    threads = [threading.Thread(target=_reserve_until_full, args=(db_path, go, results, settle_share))
               for _ in range(8)]
    for worker in procs + threads:
        worker.start()
    go.set()
    totals = [results.get(timeout=120) for _ in range(10)]
    for worker in procs + threads:
        worker.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    db = open_database(db_path)
    live = db.execute("select coalesce(sum(dollars), 0) from reservations").fetchone()[0]
    spent = spend_row(db)[0]
    if settle_share is None:  # nothing settled: the reservations fill the cap exactly, never more
        assert sum(totals) == live == DAY.dollars and spent == 0
    else:  # all settled: the real spend is booked exactly once each, and it never passed the cap
        assert live == 0 and spent == pytest.approx(sum(totals)) and spent <= DAY.dollars
        assert spent > DAY.dollars - PER / 8  # and the cap was used up to its last completion


def test_settle_books_the_real_spend_exactly_once(fresh_db):
    spend = SpendLedger(fresh_db)
    r = spend.reserve([DAY, Cap("tier:free", "per_month", dollars=10.0)], 2, PER, 100, allow_fewer=False, now=T0)
    assert spend.settle(r, 0.3, 150) is True
    assert spend.settle(r, 0.3, 150) is False  # a retried settle
    assert spend_row(fresh_db) == (0.3, 150) and spend_row(fresh_db, window="per_month") == (0.3, 150)
    assert fresh_db.execute("select count(*) from reservations").fetchone()[0] == 0


def test_settle_after_expiry_and_sweep_still_books_once(fresh_db):
    spend = SpendLedger(fresh_db)
    r = spend.reserve([DAY], 2, PER, 0, allow_fewer=False, expires_at=T0 + 1, now=T0)
    assert spend.release_expired(now=T0 + 2) == 1
    assert spend.settle(r, 0.4, 0) and not spend.settle(r, 0.4, 0)
    assert spend_row(fresh_db) == (0.4, 0)
    with pytest.raises(ValueError):  # an id is used once
        spend.reserve([DAY], 1, PER, 0, allow_fewer=False, reservation_id=r.id, now=T0)


def test_release_expired_counts_reservations_not_rows(fresh_db):
    spend = SpendLedger(fresh_db)
    month = Cap("tier:free", "per_month", dollars=10.0)
    for i, expires in enumerate([T0 + 1, T0 + 2, T0 + 30]):
        spend.reserve([DAY, month], 1, PER, 5, allow_fewer=False, reservation_id=f"r{i}", expires_at=expires, now=T0)
    assert spend.release_expired(now=T0 + 0.5) == 0
    assert spend.release_expired(now=T0 + 2) == 2
    assert spend.release_expired(now=T0 + 2) == 0
    live = {(r["scope"], r["window"]): (r["dollars"], r["tokens"]) for r in spend.reserved(now=T0 + 3)}
    assert live == {("tier:free", "per_day"): (PER, 5), ("tier:free", "per_month"): (PER, 5)}
    assert spend.reserved(now=T0 + 30) == []  # expired counts as released even before a sweep


def test_reserved_and_current_report_only_current_windows(fresh_db):
    spend = SpendLedger(fresh_db)
    r = spend.reserve([DAY], 1, PER, 7, allow_fewer=False, now=T0, expires_at=T0 + 100_000)
    spend.settle(r, 0.1, 7)
    spend.reserve([DAY], 1, PER, 7, allow_fewer=False, now=T0, expires_at=T0 + 100_000)
    assert spend.current(now=T0) == [{"scope": "tier:free", "window": "per_day", "dollars": 0.1, "tokens": 7}]
    assert [(r["dollars"], r["tokens"]) for r in spend.reserved(now=T0)] == [(PER, 7)]
    tomorrow = window_bounds("per_day", T0)[1] + 1
    assert spend.current(now=tomorrow) == [] and spend.reserved(now=tomorrow) == []


def test_a_locked_store_raises_store_unavailable(db_path):
    spend = ledger(db_path, busy_timeout=0.1)
    r = spend.reserve([DAY], 1, PER, 0, allow_fewer=False, now=T0)
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        for call in (lambda: spend.reserve([DAY], 1, PER, 0, allow_fewer=False, now=T0),
                     lambda: spend.settle(r, PER, 0), lambda: spend.release_expired(now=T0)):
            with pytest.raises(StoreUnavailable, match="locked") as exc:
                call()
            assert isinstance(exc.value.__cause__, sqlite3.OperationalError)
    finally:
        holder.execute("ROLLBACK")
    assert spend.settle(r, PER, 0)  # the failed settle booked nothing: it succeeds now, once
    assert spend_row(spend.db) == (PER, 0)


def test_a_full_disk_raises_store_unavailable(fresh_db):
    spend = SpendLedger(fresh_db)
    pages = fresh_db.execute("PRAGMA page_count").fetchone()[0]
    fresh_db.execute(f"PRAGMA max_page_count = {pages}")  # the file cannot grow: SQLITE_FULL
    unlimited = Cap("tier:free", "per_day")
    with pytest.raises(StoreUnavailable, match="full") as exc:
        for _ in range(100_000):
            spend.reserve([unlimited], 8, PER, 1000, allow_fewer=False, owner="x" * 200, now=T0)
    assert exc.value.__cause__.sqlite_errorname == "SQLITE_FULL"
