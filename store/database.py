"""Opens the SQLite file in WAL mode and creates the schema (idempotent)."""
from __future__ import annotations

import contextlib
import sqlite3
from typing import Iterator

import sqlite_utils

SCHEMA = {
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
    "spend": (
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

INDEXES = [
    ("requests", ["route", "created"]),
    ("requests", ["kind", "route"]),
    ("feedback", ["request_id"]),
]


def open_database(path: str, *, create: bool = True) -> sqlite_utils.Database:
    """A sqlite-utils Database on `path` with WAL, a busy timeout and the schema in place."""
    conn = sqlite3.connect(path, timeout=30.0, check_same_thread=False)
    db = sqlite_utils.Database(conn)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA foreign_keys=ON")
    if create:
        for name, (columns, options) in SCHEMA.items():
            if not db[name].exists():
                db[name].create(columns, **options)
        existing = {tuple(i.columns) for t in ("requests", "feedback") for i in db[t].indexes}
        for table, columns in INDEXES:
            if tuple(columns) not in existing:
                db[table].create_index(columns, if_not_exists=True)
    return db


@contextlib.contextmanager
def write_transaction(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """BEGIN IMMEDIATE ... COMMIT: takes the write lock up front, so concurrent writers wait on the
    busy timeout instead of failing with "database is locked" when a read snapshot goes stale."""
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        if db.conn.in_transaction:
            db.conn.execute("ROLLBACK")
        raise
    else:
        db.conn.execute("COMMIT")
