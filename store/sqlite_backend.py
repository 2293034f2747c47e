"""The SQLite backend: one file in WAL mode, its migrations, and the `Database` operations on it.

The schema version lives in `PRAGMA user_version`; `MIGRATIONS[k]` takes a file from version k to
k + 1. Opening applies the missing steps in one BEGIN IMMEDIATE transaction and re-reads the version
under that write lock, so several processes may open (and upgrade) the same file at once. A file at
version 0 that already has the tables (made before versions existed) is version 1. Writers serialise
on BEGIN IMMEDIATE: that one lock is what makes caps exact across processes on one host.
"""
from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from typing import Callable, Iterator

import sqlite_utils

from store.errors import Conflict, StoreUnavailable, is_unavailable
from store.result import Result, SharedOperations

SCHEMA_V1 = {
    "requests": (
        {
            "id": str, "created": float, "kind": str, "route": str, "tier": str, "upstream": str,
            "policy_version": int, "prompt_id": str, "prompt_version": str, "n": int, "aggregator": str, "messages": str,
            "query_key": str, "chosen_index": int, "chosen_answer": str, "tie_size": int,
            "vote_share": float, "prompt_tokens": int, "completion_tokens": int, "cost": float,
            "latency_s": float, "upstream_latency_s": float, "failed": int, "status": int,
            "error": str, "run_id": str,
        },
        {"pk": "id"},
    ),
    "completions": (
        {
            "request_id": str, "idx": int, "text": str, "answer": str, "scores": str,
            "prompt_tokens": int, "completion_tokens": int, "cost": float, "finish_reason": str,
            "latency_s": float, "error": str,
        },
        {"pk": ("request_id", "idx"), "foreign_keys": [("request_id", "requests", "id")]},
    ),
    "feedback": (
        {"id": int, "request_id": str, "created": float, "gold": str, "score": float, "objective": str},
        {"pk": "id"},
    ),
    "policy_versions": (
        {"version": int, "created": float, "run_id": str, "note": str},
        {"pk": "version"},
    ),
    "policies": (
        {
            "version": int, "route": str, "tier": str, "prompt_id": str, "n": int, "value": float,
            "value_se": float, "budget_spent": int, "created": float, "run_id": str,
        },
        {"pk": ("version", "route", "tier")},
    ),
    "spend": (  # reserved_* are unused since version 3 (reservations have their own table); kept at 0
        {"scope": str, "window": str, "window_start": float, "dollars": float, "tokens": int,
         "reserved_dollars": float, "reserved_tokens": int},
        {"pk": ("scope", "window", "window_start"), "defaults": {"dollars": 0.0, "tokens": 0,
                                                                "reserved_dollars": 0.0, "reserved_tokens": 0}},
    ),
    "api_keys": (
        {"hash": str, "tier": str, "name": str, "created": float, "revoked": float},
        {"pk": "hash"},
    ),
    "training_locks": (
        {"route": str, "run_id": str, "pid": int, "acquired": float},
        {"pk": "route"},
    ),
}

INDEXES_V1 = [
    ("requests", ["route", "created"]),
    ("requests", ["kind", "route"]),
    ("feedback", ["request_id"]),
]


def _v1_base_schema(db: sqlite_utils.Database) -> None:
    """The schema as it was before versions: create whatever tables and indexes are missing."""
    for name, (columns, options) in SCHEMA_V1.items():
        if not db[name].exists():
            db[name].create(columns, **options)
    for table, columns in INDEXES_V1:
        db[table].create_index(columns, if_not_exists=True)


def _v2_request_columns(db: sqlite_utils.Database) -> None:
    """requests.key_id (16 hex digits of the caller's key hash, NULL when anonymous), endpoint
    (chat|completions|embeddings|responses) and upstream_id (the provider's response id)."""
    existing = db["requests"].columns_dict
    for column in ("key_id", "endpoint", "upstream_id"):
        if column not in existing:
            db["requests"].add_column(column, str)


def _v3_reservations(db: sqlite_utils.Database) -> None:
    """One row per (reservation, cap window); settled ids are remembered so a settle books once."""
    db["reservations"].create(
        {"id": str, "scope": str, "window": str, "window_start": float, "dollars": float, "tokens": int,
         "owner": str, "expires": float},
        pk=("id", "scope", "window", "window_start"), if_not_exists=True)
    db["reservations"].create_index(["scope", "window", "window_start", "expires"], if_not_exists=True)
    db["settled_reservations"].create({"id": str, "settled": float}, pk="id", if_not_exists=True)
    db["settled_reservations"].create_index(["settled"], if_not_exists=True)
    db.execute("update spend set reserved_dollars = 0, reserved_tokens = 0")  # leaked by the old ledger


def _v4_feedback_per_target(db: sqlite_utils.Database) -> None:
    """feedback keyed by (request_id, target): target "gold" for gold answers, the objective name
    (or "score" when none was given) for scores. Old rows split by target; the newest of each kept."""
    db["feedback_v4"].create(
        {"request_id": str, "target": str, "created": float, "gold": str, "score": float, "objective": str},
        pk=("request_id", "target"))
    db.execute("""
        insert into feedback_v4 (request_id, target, created, gold, score, objective)
        select request_id, target, created, gold, score, objective from (
            select *, row_number() over (partition by request_id, target order by created desc, id desc) as newest
            from (select id, request_id, 'gold' as target, created, gold, null as score, null as objective
                    from feedback where gold is not null
                  union all
                  select id, request_id, coalesce(objective, 'score'), created, null, score, objective
                    from feedback where score is not null))
        where newest = 1""")
    db["feedback"].drop()
    db.rename_table("feedback_v4", "feedback")


def _v5_training_runs_and_ranked_arms(db: sqlite_utils.Database) -> None:
    """training_runs (a run's identity, settings and queries, so a killed run can resume under its id);
    requests.run_pull (an exploration pull's position in its run); policy_arms (each published
    (route, tier)'s arms ranked by estimated value, with their cost)."""
    db["training_runs"].create(
        {"run_id": str, "route": str, "status": str, "started": float, "finished": float, "fingerprint": str,
         "budget": int, "spent": int, "dollars": float, "queries": str, "report": str},
        pk="run_id", if_not_exists=True)
    db["training_runs"].create_index(["route", "started"], if_not_exists=True)
    if "run_pull" not in db["requests"].columns_dict:
        db["requests"].add_column("run_pull", int)
    db["requests"].create_index(["run_id", "run_pull"], if_not_exists=True)
    db["policy_arms"].create(
        {"version": int, "route": str, "tier": str, "rank": int, "prompt_id": str, "n": int, "value": float,
         "value_se": float, "cost": float},
        pk=("version", "route", "tier", "rank"), if_not_exists=True)


def _v6_training_lock_lease(db: sqlite_utils.Database) -> None:
    """training_locks.host and .expires: a lock is a lease that its run renews; an expired one (or one
    whose process is gone, on the same host) is taken over, whichever replica finds it."""
    existing = db["training_locks"].columns_dict
    if "host" not in existing:
        db["training_locks"].add_column("host", str)
    if "expires" not in existing:
        db["training_locks"].add_column("expires", float)


def _v7_key_roles_and_admin_actions(db: sqlite_utils.Database) -> None:
    """api_keys.role ('caller' or 'admin'), .models and .caps (JSON: a key's own model list and spend caps);
    admin_actions: what each admin key did, and when."""
    existing = db["api_keys"].columns_dict
    for column in ("role", "models", "caps"):
        if column not in existing:
            db["api_keys"].add_column(column, str)
    db["admin_actions"].create({"id": str, "created": float, "admin": str, "action": str, "target": str,
                                "detail": str}, pk="id", if_not_exists=True)
    db["admin_actions"].create_index(["created"], if_not_exists=True)


def _v8_training_batches(db: sqlite_utils.Database) -> None:
    """training_batches: the provider batch job that holds each round of a batch-mode training run."""
    db["training_batches"].create({"run_id": str, "round": int, "batch_id": str, "status": str, "submitted": float,
                                   "completed": float, "requests": int}, pk=("run_id", "round"), if_not_exists=True)


def _v9_request_waves(db: sqlite_utils.Database) -> None:
    """requests.waves: how many waves a sequential (adaptive) request drew; NULL for one draw of N."""
    if "waves" not in db["requests"].columns_dict:
        db["requests"].add_column("waves", int)


def _v10_policy_stop(db: sqlite_utils.Database) -> None:
    """policies.stop: a learned sequential arm's stopping rule (settled, likely<ε>, lead<d>); NULL for a fixed arm."""
    if "stop" not in db["policies"].columns_dict:
        db["policies"].add_column("stop", str)


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    _v1_base_schema, _v2_request_columns, _v3_reservations, _v4_feedback_per_target,
    _v5_training_runs_and_ranked_arms, _v6_training_lock_lease, _v7_key_roles_and_admin_actions,
    _v8_training_batches, _v9_request_waves, _v10_policy_stop,
]
LATEST_VERSION = len(MIGRATIONS)


def schema_version(db: sqlite_utils.Database) -> int:
    """The file's schema version (`PRAGMA user_version`)."""
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: sqlite_utils.Database) -> int:
    """Apply the missing migration steps in one write transaction; returns the version reached."""
    if schema_version(db) >= LATEST_VERSION:
        return schema_version(db)
    with _write_lock(db):
        version = schema_version(db)  # another process may have migrated while we waited for the lock
        for step in MIGRATIONS[version:]:
            step(db)
        if version < LATEST_VERSION:
            db.execute(f"PRAGMA user_version = {LATEST_VERSION}")
    return max(version, LATEST_VERSION)


def _set_up(conn: sqlite3.Connection, busy_timeout: float) -> None:
    """WAL, synchronous=NORMAL, foreign keys. Switching a new file to WAL takes an exclusive lock, and
    SQLite answers "database is locked" at once, without waiting on the busy timeout, when another
    connection opening the same new file holds a lock: retry with backoff until the timeout."""
    deadline, pause = time.monotonic() + busy_timeout, 0.002
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.1)


class SQLiteDatabase(SharedOperations):
    """One connection to a SQLite file (WAL, synchronous=NORMAL, foreign keys on)."""

    dialect = "sqlite"

    def __init__(self, path: str, *, busy_timeout: float = 30.0) -> None:
        self.url = path
        # one connection may be used from several threads (asyncio.to_thread): statements, transactions
        # and close take turns, so a close never frees the connection under a running statement
        self._turn = threading.RLock()
        try:
            # autocommit: a statement outside `transaction()` commits at once (no implicit BEGIN left open)
            self.conn = sqlite3.connect(path, timeout=busy_timeout, check_same_thread=False, isolation_level=None)
            _set_up(self.conn, busy_timeout)
        except sqlite3.Error as exc:
            raise _mapped(exc) from exc
        self.utils = sqlite_utils.Database(self.conn)

    def __getitem__(self, table: str) -> sqlite_utils.db.Table:
        """sqlite-utils' table (migrations and SQLite-only tooling)."""
        return self.utils[table]

    def __getattr__(self, name: str):
        """Anything else sqlite-utils offers (table_names, indexes, ...), for SQLite-only tooling and tests."""
        if name == "utils":
            raise AttributeError(name)
        return getattr(self.utils, name)

    def execute(self, sql: str, params=()) -> Result:
        try:
            with self._turn:
                cursor = self.conn.execute(sql, list(params))
                columns = [d[0] for d in cursor.description] if cursor.description else []
                return Result(cursor.fetchall() if columns else [], cursor.rowcount, columns)
        except sqlite3.Error as exc:
            raise _mapped(exc) from exc

    def executemany(self, sql: str, rows) -> None:
        try:
            with self._turn:
                self.conn.executemany(sql, rows)
        except sqlite3.Error as exc:
            raise _mapped(exc) from exc

    @contextlib.contextmanager
    def transaction(self, *locks: str) -> Iterator["SQLiteDatabase"]:
        """BEGIN IMMEDIATE ... COMMIT: takes the file's write lock up front (so concurrent writers wait on
        the busy timeout instead of failing when a read snapshot goes stale); `locks` are implied by it."""
        with self._turn:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise _mapped(exc) from exc
            try:
                yield self
                self.conn.execute("COMMIT")
            except BaseException as exc:
                if self.conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):  # keep the original error, not a failed rollback's
                        self.conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise _mapped(exc) from exc
                raise

    def set_busy_timeout(self, seconds: float) -> None:
        """How long a statement waits for another connection's lock before "database is locked"."""
        with self._turn:
            self.conn.execute(f"PRAGMA busy_timeout = {int(seconds * 1000)}")

    def version(self) -> int:
        with self._turn:
            return schema_version(self.utils)

    def migrate(self) -> int:
        try:
            with self._turn:
                return migrate(self.utils)
        except sqlite3.Error as exc:
            raise _mapped(exc) from exc

    def close(self) -> None:
        with self._turn:
            self.conn.close()


def _mapped(exc: sqlite3.Error) -> Exception:
    """SQLite's failure as the store's: storage unavailable, a conflicting key, or the error itself (a bug)."""
    if is_unavailable(exc):
        return StoreUnavailable(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, sqlite3.IntegrityError):
        return Conflict(str(exc))
    return exc


@contextlib.contextmanager
def _write_lock(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """BEGIN IMMEDIATE ... COMMIT on the raw sqlite-utils database (migrations)."""
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.conn.execute("COMMIT")
    except BaseException:
        if db.conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.conn.execute("ROLLBACK")
        raise
