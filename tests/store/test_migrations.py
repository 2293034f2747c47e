"""Schema versions: new files, files made before versions existed, and processes opening at once."""
from __future__ import annotations

import multiprocessing
import sqlite3

from store.database import LATEST_VERSION, open_database, schema_version
from store_testing import db_path, fresh_db  # noqa: F401  (fixtures)

# The schema as `git show HEAD~:store/database.py` created it, before versions existed.
OLD_SCHEMA = """
CREATE TABLE "requests" ("id" TEXT PRIMARY KEY, "created" REAL, "kind" TEXT, "route" TEXT, "tier" TEXT,
   "upstream" TEXT, "policy_version" INTEGER, "prompt_id" TEXT, "prompt_version" TEXT, "n" INTEGER,
   "aggregator" TEXT, "messages" TEXT, "query_key" TEXT, "chosen_index" INTEGER, "chosen_answer" TEXT,
   "tie_size" INTEGER, "vote_share" REAL, "prompt_tokens" INTEGER, "completion_tokens" INTEGER, "cost" REAL,
   "latency_s" REAL, "upstream_latency_s" REAL, "failed" INTEGER, "status" INTEGER, "error" TEXT, "run_id" TEXT);
CREATE TABLE "completions" ("request_id" TEXT REFERENCES "requests"("id"), "idx" INTEGER, "text" TEXT,
   "answer" TEXT, "scores" TEXT, "prompt_tokens" INTEGER, "completion_tokens" INTEGER, "cost" REAL,
   "finish_reason" TEXT, "latency_s" REAL, "error" TEXT, PRIMARY KEY ("request_id", "idx"));
CREATE TABLE "feedback" ("id" INTEGER PRIMARY KEY, "request_id" TEXT, "created" REAL, "gold" TEXT, "score" REAL,
   "objective" TEXT);
CREATE TABLE "policy_versions" ("version" INTEGER PRIMARY KEY, "created" REAL, "run_id" TEXT, "note" TEXT);
CREATE TABLE "policies" ("version" INTEGER, "route" TEXT, "tier" TEXT, "prompt_id" TEXT, "n" INTEGER,
   "value" REAL, "value_se" REAL, "budget_spent" INTEGER, "created" REAL, "run_id" TEXT,
   PRIMARY KEY ("version", "route", "tier"));
CREATE TABLE "spend" ("scope" TEXT, "window" TEXT, "window_start" REAL, "dollars" REAL DEFAULT 0.0,
   "tokens" INTEGER DEFAULT 0, "reserved_dollars" REAL DEFAULT 0.0, "reserved_tokens" INTEGER DEFAULT 0,
   PRIMARY KEY ("scope", "window", "window_start"));
CREATE TABLE "api_keys" ("hash" TEXT PRIMARY KEY, "tier" TEXT, "name" TEXT, "created" REAL, "revoked" REAL);
CREATE TABLE "training_locks" ("route" TEXT PRIMARY KEY, "run_id" TEXT, "pid" INTEGER, "acquired" REAL);
CREATE INDEX "idx_requests_route_created" ON "requests" ("route", "created");
CREATE INDEX "idx_requests_kind_route" ON "requests" ("kind", "route");
CREATE INDEX "idx_feedback_request_id" ON "feedback" ("request_id");
"""

OLD_ROWS = """
INSERT INTO requests (id, created, kind, route, tier, query_key, status, messages)
  VALUES ('r1', 1.0, 'serve', 'math', 'free', 'q1', 200, '[]'), ('r2', 2.0, 'serve', 'math', 'free', 'q2', 200, '[]');
INSERT INTO completions (request_id, idx, text, answer) VALUES ('r1', 0, 'x', '4'), ('r1', 1, 'y', '5');
INSERT INTO feedback (id, request_id, created, gold, score, objective) VALUES
  (1, 'r1', 10.0, '4', NULL, NULL), (2, 'r1', 20.0, '5', NULL, NULL), (3, 'r1', 15.0, NULL, 0.5, 'style'),
  (4, 'r1', 30.0, NULL, 0.9, 'style'), (5, 'r2', 5.0, '7', 0.25, NULL), (6, 'r2', 4.0, NULL, 0.75, NULL);
INSERT INTO spend VALUES ('tier:free', 'per_day', 0.0, 1.5, 300, 0.25, 40);
INSERT INTO policy_versions VALUES (1, 1.0, 'run', 'first');
INSERT INTO api_keys VALUES ('sha256:abc', 'free', 'ci', 1.0, NULL);
"""


def make_old_file(path: str, user_version: int = 0) -> None:
    conn = sqlite3.connect(path)
    conn.executescript(OLD_SCHEMA + OLD_ROWS + f"PRAGMA user_version = {user_version};")
    conn.commit()
    conn.close()


def test_a_new_file_gets_the_newest_schema(fresh_db):
    assert schema_version(fresh_db) == LATEST_VERSION
    assert {"requests", "completions", "feedback", "spend", "reservations"} <= set(fresh_db.table_names())
    assert {"key_id", "endpoint", "upstream_id"} <= set(fresh_db["requests"].columns_dict)
    assert [i.columns for i in fresh_db["reservations"].indexes if i.origin == "c"] == [
        ["scope", "window", "window_start", "expires"]]
    assert fresh_db["reservations"].pks == ["id", "scope", "window", "window_start"]
    assert fresh_db["feedback"].pks == ["request_id", "target"]


def test_reopening_is_a_no_op(db_path):
    open_database(db_path).conn.close()
    db = open_database(db_path)
    db["requests"].insert({"id": "r", "created": 1.0})
    db.conn.commit()
    again = open_database(db_path)
    assert schema_version(again) == LATEST_VERSION and again.execute("select count(*) from requests").fetchone()[0] == 1


def test_a_file_made_before_versions_upgrades_with_its_rows(db_path):
    make_old_file(db_path)
    db = open_database(db_path)
    assert schema_version(db) == LATEST_VERSION
    assert [r["id"] for r in db.query("select id from requests order by id")] == ["r1", "r2"]
    assert db.execute("select key_id, endpoint, upstream_id from requests where id = 'r1'").fetchone() == (None,) * 3
    assert db.execute("select count(*) from completions").fetchone()[0] == 2
    assert db.execute("select note from policy_versions").fetchone()[0] == "first"
    assert db.execute("select tier from api_keys").fetchone()[0] == "free"
    # spend is kept; the old reservation columns (leaked reservations) are zeroed, not counted
    assert db.execute("select dollars, tokens, reserved_dollars, reserved_tokens from spend").fetchone() == (1.5, 300, 0, 0)
    # feedback: one row per (request, target), the newest of each; a row with gold and score splits in two
    rows = {(r["request_id"], r["target"]): (r["created"], r["gold"], r["score"])
            for r in db.query("select * from feedback")}
    assert rows == {("r1", "gold"): (20.0, "5", None), ("r1", "style"): (30.0, None, 0.9),
                    ("r2", "gold"): (5.0, "7", None), ("r2", "score"): (5.0, None, 0.25)}


def test_a_file_at_version_1_upgrades(db_path):
    make_old_file(db_path, user_version=1)
    db = open_database(db_path)
    assert schema_version(db) == LATEST_VERSION and "reservations" in db.table_names()
    assert db.execute("select count(*) from feedback").fetchone()[0] == 4


def _open_and_write(path: str, name: str, go) -> None:
    go.wait(10)
    db = open_database(path)
    db["requests"].insert({"id": name, "created": 1.0})
    db.conn.commit()


def test_processes_opening_a_new_file_at_once_all_succeed(db_path):
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    procs = [ctx.Process(target=_open_and_write, args=(db_path, f"p{i}", go)) for i in range(4)]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    db = open_database(db_path)
    assert schema_version(db) == LATEST_VERSION
    assert db.execute("select count(*) from requests").fetchone()[0] == 4
    assert db.execute("select count(*) from sqlite_master where name = 'reservations'").fetchone()[0] == 1


def test_processes_upgrading_an_old_file_at_once_all_succeed(db_path):
    make_old_file(db_path)
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    procs = [ctx.Process(target=_open_and_write, args=(db_path, f"p{i}", go)) for i in range(3)]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 3
    db = open_database(db_path)
    assert schema_version(db) == LATEST_VERSION
    assert db.execute("select count(*) from feedback").fetchone()[0] == 4  # migrated once, not twice
    assert db.execute("select count(*) from requests").fetchone()[0] == 5
