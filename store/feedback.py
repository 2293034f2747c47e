"""Feedback rows: one per (request_id, target); a later row for the same target REPLACES the earlier.

The target is "gold" for a gold answer and the objective's name for a score ("score" when the
caller named no objective). "Later" means a larger `created`: of two rows for the same target, the
one created last wins whatever order they are written in; equal times keep the one written last.
"""
from __future__ import annotations

GOLD = "gold"
DEFAULT_SCORE_TARGET = "score"

_UPSERT = (
    "insert into feedback (request_id, target, created, gold, score, objective) values (?, ?, ?, ?, ?, ?)"
    " on conflict (request_id, target) do update set created = excluded.created, gold = excluded.gold,"
    " score = excluded.score, objective = excluded.objective where excluded.created >= feedback.created"
)


def feedback_rows(feedback: dict) -> list[dict]:
    """The per-target rows of one feedback payload {request_id, created, gold?, score?, objective?}:
    a gold row and/or a score row. A dict that already names its `target` is one row as it is."""
    if "target" in feedback:
        return [feedback]
    base = {"request_id": feedback["request_id"], "created": feedback["created"]}
    rows = []
    if feedback.get("gold") is not None:
        rows.append({**base, "target": GOLD, "gold": feedback["gold"], "score": None, "objective": None})
    if feedback.get("score") is not None:
        objective = feedback.get("objective")
        rows.append({**base, "target": objective or DEFAULT_SCORE_TARGET, "gold": None, "score": feedback["score"],
                     "objective": objective})
    return rows


def upsert_feedback(db, rows: list[dict]) -> None:
    """Write per-target rows, each replacing an older row for its (request_id, target)."""
    db.executemany(_UPSERT, [(r["request_id"], r["target"], r["created"], r.get("gold"), r.get("score"),
                                   r.get("objective")) for r in rows])
