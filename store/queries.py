"""Read-side queries over the log: one request, its answers, feedback, training queries."""
from __future__ import annotations

import json

from store.database import Database


def find_request(db: Database, request_id: str) -> dict | None:
    rows = db.query("select * from requests where id = ?", [request_id])
    return rows[0] if rows else None


def feedback_for(db: Database, request_id: str) -> list[dict]:
    """The request's feedback, one row per target (the newest for each), ordered by target."""
    return db.query("select request_id, target, created, gold, score, objective from feedback"
                    " where request_id = ? order by target", [request_id])


def completion_answers(db: Database, request_id: str) -> list[str | None]:
    return [r["answer"] for r in db.query(
        "select answer from completions where request_id = ? and error is null order by idx", [request_id])]


def training_queries(db: Database, route: str, *, since: float, limit: int) -> list[dict]:
    """Distinct served queries of a route (newest first) with their gold answer when feedback gave one
    (the newest gold among the requests sharing the query key)."""
    rows = db.query(
        """
        select q.query_key, q.messages, q.created as last_seen,
               (select f.gold from feedback f join requests r2 on r2.id = f.request_id
                 where r2.query_key = q.query_key and f.target = 'gold' and f.gold is not null
                 order by f.created desc limit 1) as gold
        from (select r.query_key, r.messages, r.created,
                     row_number() over (partition by r.query_key order by r.created desc, r.id) as newest
              from requests r
              where r.route = ? and r.kind = 'serve' and r.created >= ? and r.status = 200) q
        where q.newest = 1 order by q.created desc limit ?
        """,
        [route, since, limit],
    )
    return [{"query_key": r["query_key"], "messages": json.loads(r["messages"]), "gold": r["gold"]} for r in rows]


def served_pulls(db: Database, route: str, *, since: float, until: float | None = None) -> list[dict]:
    """Requests served on a route in [since, until): (query_key, prompt_id, n) with their completions'
    answers and costs, in a stable order (a resumed training run must be offered exactly the same).
    Adaptive requests are left out, whether they stopped early or not: when they stopped depended on
    what they drew, so their answers are a biased sample of the prompt's."""
    until = float("inf") if until is None else until
    requests = list(db.query(
        "select id, query_key, prompt_id, prompt_version, n from requests where route = ? and kind = 'serve'"
        " and status = 200 and created >= ? and created < ? and failed = 0 and waves is null order by created, id",
        [route, since, until]))
    if not requests:
        return []
    by_id = {r["id"]: {**r, "answers": [], "costs": [], "scores": []} for r in requests}
    for c in db.query(
        "select c.request_id, c.answer, c.cost, c.scores from completions c join requests r on r.id = c.request_id"
        " where r.route = ? and r.kind = 'serve' and r.status = 200 and r.created >= ? and r.created < ?"
        " and r.failed = 0 order by c.request_id, c.idx", [route, since, until]):
        entry = by_id.get(c["request_id"])
        if entry is None:  # written after the first read
            continue
        entry["answers"].append(c["answer"])
        entry["costs"].append(c["cost"] or 0.0)
        entry["scores"].append(json.loads(c["scores"]) if c["scores"] else None)
    return list(by_id.values())
