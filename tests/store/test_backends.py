"""Every store component on both backends: a fresh SQLite file and a fresh database on a real
PostgreSQL server (the `store_url` fixture runs each test once per backend)."""
from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time

import pytest

from policies.arms import Arm, RankedArm
from policies.budget import Cap
from store.database import open_database
from store.errors import Conflict
from store.keys import KeyStore
from store.policy_store import PolicyEntry, PolicyStore, PolicyVersionMissing
from store.queries import feedback_for, find_request, served_pulls, training_queries
from store.spend import BudgetExhausted, SpendLedger
from store.training_lock import TrainingLock, TrainingLockHeld
from store.training_runs import TrainingRun, TrainingRuns
from store.writer import FeedbackLog, LogWriter, RequestLog

CAP = Cap("tier:t", "per_day", dollars=1.0, tokens=10_000)


def request(i: int, *, route: str = "math", created: float | None = None, query: str | None = None) -> RequestLog:
    rid = f"req-{i}"
    row = {"id": rid, "created": created or time.time(), "kind": "serve", "route": route, "tier": "t",
           "prompt_id": "p0", "prompt_version": "v", "n": 2, "status": 200, "failed": 0, "messages": '[{"role": "user"}]',
           "query_key": query or f"q{i}", "cost": 0.5}
    completions = [{"request_id": rid, "idx": k, "text": f"answer {k}", "answer": str(k), "cost": 0.25}
                   for k in range(2)]
    return RequestLog(row, completions)


def test_migrations_are_idempotent_and_concurrent_opens_agree(store_url):
    versions = []
    errors = []

    def open_once():
        try:
            versions.append(open_database(store_url).version())
        except Exception as exc:  # pragma: no cover - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=open_once) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(versions)) == 1 and versions[0] >= 1


def _reserve_many(url: str, count: int, out) -> None:
    ledger = SpendLedger(open_database(url))
    granted = 0
    for _ in range(count):
        try:
            ledger.reserve([CAP], 1, 0.03, 10, allow_fewer=False, owner="p")
            granted += 1
        except BudgetExhausted:
            pass
    out.put(granted)


def test_concurrent_reservations_from_threads_and_processes_never_pass_a_cap(store_url):
    SpendLedger(open_database(store_url))  # create the schema before the racers start
    out = multiprocessing.get_context("spawn").Queue()
    procs = [multiprocessing.get_context("spawn").Process(target=_reserve_many, args=(store_url, 20, out))
             for _ in range(2)]
    for p in procs:
        p.start()
    threads = [threading.Thread(target=_reserve_many, args=(store_url, 20, out)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        p.join(60)
    granted = sum(out.get(timeout=10) for _ in range(6))
    assert granted == 33  # floor($1.00 / $0.03): not one more, across 4 threads and 2 processes
    held = SpendLedger(open_database(store_url)).reserved()
    assert held[0]["dollars"] == pytest.approx(0.99)


def test_settle_books_once_and_expired_reservations_stop_counting(store_url):
    ledger = SpendLedger(open_database(store_url))
    now = time.time()
    stuck = ledger.reserve([CAP], 30, 0.03, 10, allow_fewer=False, owner="dead", expires_at=now + 5, now=now)
    with pytest.raises(BudgetExhausted):
        ledger.reserve([CAP], 5, 0.03, 10, allow_fewer=False, now=now + 1)
    fits = ledger.reserve([CAP], 5, 0.03, 10, allow_fewer=False, now=now + 6)  # the stuck one expired
    assert ledger.settle(fits, 0.1, 100) and not ledger.settle(fits, 0.1, 100)
    assert ledger.release_expired(now + 10) == 1
    assert ledger.settle(stuck, 0.2, 5)  # a late settle still books its real spend, once
    [row] = [r for r in ledger.current(now) if r["scope"] == "tier:t"]
    assert row["dollars"] == pytest.approx(0.3) and row["tokens"] == 105
    index, reservation = ledger.reserve_first([CAP], [(100, 0.03, 10), (2, 0.03, 10)], now=now + 11)
    assert (index, reservation.n) == (1, 2)


def test_the_writer_commits_batches_and_acknowledges_after_commit(store_url):
    writer = LogWriter(store_url, batch_size=8)

    async def submit_all():
        return await asyncio.gather(*(writer.submit(request(i), wait=True) for i in range(40)))

    assert all(asyncio.run(submit_all()))
    db = open_database(store_url)
    assert db.execute("select count(*) from requests").fetchone()[0] == 40  # visible from another connection
    assert db.execute("select count(*) from completions").fetchone()[0] == 80
    writer.submit_blocking(request(0), wait=True)  # the same id again replaces, never duplicates
    writer.submit_blocking(FeedbackLog({"request_id": "req-1", "created": 1.0, "gold": "1"}), wait=True)
    writer.submit_blocking(FeedbackLog({"request_id": "req-1", "created": 2.0, "gold": "2"}), wait=True)
    writer.close()
    assert db.execute("select count(*) from requests").fetchone()[0] == 40
    assert [f["gold"] for f in feedback_for(db, "req-1")] == ["2"]
    assert find_request(db, "req-3")["cost"] == 0.5


def test_training_queries_and_served_pulls(store_url):
    writer = LogWriter(store_url)
    base = time.time() - 100
    for i in range(6):
        writer.submit_blocking(request(i, created=base + i, query=f"q{i % 3}"))
    writer.submit_blocking(FeedbackLog({"request_id": "req-4", "created": base, "gold": "7"}))
    writer.close()
    db = open_database(store_url)
    queries = training_queries(db, "math", since=base - 1, limit=10)
    assert [q["query_key"] for q in queries] == ["q2", "q1", "q0"]  # newest first, one per query
    assert {q["query_key"]: q["gold"] for q in queries}["q1"] == "7"
    pulls = served_pulls(db, "math", since=base - 1, until=base + 3.5)
    assert [p["id"] for p in pulls] == ["req-0", "req-1", "req-2", "req-3"]
    assert pulls[0]["answers"] == ["0", "1"] and pulls[0]["costs"] == [0.25, 0.25]


def test_policy_versions_publish_concurrently_and_roll_back(store_url):
    ranked = (RankedArm("p1", 4, 0.7, 0.01, 0.02), RankedArm("p2", 2, 0.6, 0.02, 0.01))
    versions = []

    def publish(i):
        store = PolicyStore(open_database(store_url))
        versions.append(store.publish([PolicyEntry("math", f"t{i}", Arm("p1", 4), 0.7, 0.01, 10, ranked)]))

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(versions) == [1, 2, 3, 4, 5]
    store = PolicyStore(open_database(store_url))
    policy = store.load()
    assert len(policy.arms) == 5 and policy.alternatives("math", "t0") == ranked
    assert store.rollback(0) == 6 and store.load().arms == {}
    with pytest.raises(PolicyVersionMissing):
        store.rollback(99)


def test_keys_revocation_is_seen_through_another_connection(store_url):
    keys = KeyStore(open_database(store_url))
    key, _ = keys.create("gold", "ci")
    other = KeyStore(open_database(store_url))
    from store.keys import hash_key

    assert other.tier_of(hash_key(key)) == "gold" and other.any()
    assert keys.revoke("ci") == 1
    assert other.tier_of(hash_key(key)) is False


def test_a_training_lock_is_a_lease_taken_over_once_expired(store_url):
    db = open_database(store_url)
    first = TrainingLock(db, "math", "run-a")
    first.acquire()
    with pytest.raises(TrainingLockHeld):
        TrainingLock(open_database(store_url), "math", "run-b").acquire()
    db.execute("update training_locks set expires = ?, host = 'another-host' where route = 'math'", [time.time() - 1])
    TrainingLock(open_database(store_url), "math", "run-b").acquire()  # the lease ran out: taken over
    assert db.execute("select run_id from training_locks").fetchone()[0] == "run-b"


def test_training_runs_remember_their_queries_and_pulls(store_url):
    db = open_database(store_url)
    runs = TrainingRuns(db)
    runs.begin(TrainingRun("run-1", "math", "running", time.time(), "fp", 100, [{"query_key": "q1", "gold": "1"}]))
    writer = LogWriter(store_url)
    log = request(9)
    log.request.update(kind="explore", run_id="run-1", run_pull=0)
    writer.submit_blocking(log)
    writer.close()
    assert runs.unfinished("math").queries == [{"query_key": "q1", "gold": "1"}]
    assert runs.logged_pulls("run-1")[0].answers == ["0", "1"]
    runs.finish("run-1", "published", {"completions": 2})
    assert runs.unfinished("math") is None and runs.get("run-1").report == {"completions": 2}


def test_a_duplicate_key_is_a_conflict_on_both_backends(store_url):
    db = open_database(store_url)
    db.insert("api_keys", [{"hash": "sha256:x", "tier": "t", "name": "a", "created": 1.0, "revoked": None}])
    with pytest.raises(Conflict):
        db.insert("api_keys", [{"hash": "sha256:x", "tier": "t", "name": "b", "created": 2.0, "revoked": None}])


def test_a_sqlite_store_copies_into_postgres_and_serves_the_same_history(tmp_path, postgres, capsys):
    from gateway.cli import main as iapo

    path = str(tmp_path / "iapo.db")
    writer = LogWriter(path)
    for i in range(5):
        writer.submit_blocking(request(i))
    writer.close()
    SpendLedger(open_database(path)).record("tier:t", ("per_day",), 0.5, 10)
    PolicyStore(open_database(path)).publish([PolicyEntry("math", "t", Arm("p1", 3), 0.5, 0.1, 10,
                                                           (RankedArm("p1", 3, 0.5, 0.1, 0.01),))])
    url = postgres.create_database()
    assert iapo(["db", "--db", url, "upgrade"]) == 0
    assert iapo(["db", "--db", path, "copy", "--to", url]) == 0
    assert iapo(["db", "--db", path, "copy", "--to", url]) == 0  # again: upserts, no duplicates
    target = open_database(url)
    assert target.execute("select count(*) from requests").fetchone()[0] == 5
    assert target.execute("select count(*) from completions").fetchone()[0] == 10
    assert PolicyStore(target).load().alternatives("math", "t")[0].n == 3
    assert SpendLedger(target).current()[0]["dollars"] == 0.5
    assert "copied" in capsys.readouterr().out
