"""Feedback keeps one row per (request, target), the newest replacing; training reads the newest gold."""
from __future__ import annotations

import json

from store.database import write_transaction
from store.feedback import feedback_rows, upsert_feedback
from store.queries import feedback_for, find_request, training_queries
from store_testing import db_path, fresh_db  # noqa: F401  (fixtures)


def add_request(db, rid: str, query_key: str, created: float, route: str = "math") -> None:
    with write_transaction(db):
        db["requests"].insert({"id": rid, "created": created, "kind": "serve", "route": route, "status": 200,
                               "query_key": query_key, "messages": json.dumps([{"role": "user", "content": query_key}])})


def give(db, request_id: str, created: float, **feedback) -> None:
    with write_transaction(db):
        upsert_feedback(db, feedback_rows({"request_id": request_id, "created": created, **feedback}))


def test_a_later_row_for_the_same_target_replaces_the_earlier(fresh_db):
    add_request(fresh_db, "r1", "q1", 1.0)
    give(fresh_db, "r1", 10.0, gold="4")
    give(fresh_db, "r1", 11.0, score=0.2, objective="style")
    give(fresh_db, "r1", 12.0, score=0.3)  # no objective: target "score"
    give(fresh_db, "r1", 13.0, gold="5", score=0.9, objective="style")  # one payload, two targets
    rows = [(r["target"], r["created"], r["gold"], r["score"]) for r in feedback_for(fresh_db, "r1")]
    assert rows == [("gold", 13.0, "5", None), ("score", 12.0, None, 0.3), ("style", 13.0, None, 0.9)]


def test_an_older_row_written_late_does_not_replace_a_newer_one(fresh_db):
    add_request(fresh_db, "r1", "q1", 1.0)
    give(fresh_db, "r1", 20.0, gold="new")
    give(fresh_db, "r1", 10.0, gold="old")
    assert [r["gold"] for r in feedback_for(fresh_db, "r1")] == ["new"]
    assert feedback_for(fresh_db, "nope") == []


def test_training_queries_read_the_newest_gold_of_a_query_key(fresh_db):
    add_request(fresh_db, "a", "q1", 1.0)
    add_request(fresh_db, "b", "q1", 2.0)  # the same query served twice
    add_request(fresh_db, "c", "q2", 3.0)
    add_request(fresh_db, "d", "q3", 4.0, route="other")
    give(fresh_db, "a", 10.0, gold="1")
    give(fresh_db, "b", 11.0, gold="2")
    give(fresh_db, "c", 12.0, score=0.5)  # a score is not a gold
    queries = {q["query_key"]: q["gold"] for q in training_queries(fresh_db, "math", since=0.0, limit=10)}
    assert queries == {"q1": "2", "q2": None}
    give(fresh_db, "a", 13.0, gold="3")  # a's gold replaced, and now the newest of q1
    assert training_queries(fresh_db, "math", since=0.0, limit=10)[1] == {
        "query_key": "q1", "messages": [{"role": "user", "content": "q1"}], "gold": "3"}
    assert fresh_db.execute("select count(*) from feedback where request_id = 'a'").fetchone()[0] == 1


def test_find_request(fresh_db):
    add_request(fresh_db, "a", "q1", 1.0)
    assert find_request(fresh_db, "a")["query_key"] == "q1" and find_request(fresh_db, "b") is None
