"""POST /v1/feedback: attach a gold answer or a score to a response served to the same caller.

A response belongs to the key it was served to; anonymous responses take anonymous feedback only
when `access.anonymous_feedback` allows it. One gold and one score per objective per response: a
later one replaces the earlier (so a wrong label can be corrected).
"""
from __future__ import annotations

import time

from gateway.access import Caller
from gateway.errors import invalid, not_found
from policies.utility import answers_to_counts, mv_credit
from store.queries import completion_answers, find_request
from store.writer import FeedbackLog


def _validate(payload: dict) -> tuple[str, object, object, object]:
    request_id = payload.get("id") or payload.get("response_id")
    if not isinstance(request_id, str) or not request_id:
        raise invalid("Missing required parameter: 'id' (the response id to attach feedback to).", param="id",
                      code="missing_required_parameter")
    gold, score, objective = payload.get("gold"), payload.get("score"), payload.get("objective")
    if gold is None and score is None:
        raise invalid("Provide 'gold' (the correct answer) or 'score' (a number in [0, 1]).", param="gold",
                      code="missing_required_parameter")
    if gold is not None and (isinstance(gold, bool) or not isinstance(gold, (str, int, float))):
        raise invalid("Invalid type for 'gold': expected a string.", param="gold", code="invalid_type")
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
        raise invalid("Invalid type for 'score': expected a number.", param="score", code="invalid_type")
    if objective is not None and not isinstance(objective, str):
        raise invalid("Invalid type for 'objective': expected a string.", param="objective", code="invalid_type")
    return request_id, gold, score, objective


def _owned_by(row: dict, caller: Caller, anonymous_feedback: bool) -> bool:
    if caller.key_id is not None:
        return row.get("key_id") == caller.key_id
    return anonymous_feedback and row.get("key_id") is None and row["tier"] == caller.tier.name


async def record_feedback(gateway, payload: dict, caller: Caller) -> dict:
    """Store the feedback for training; for MV with gold, count accuracy and the served utility."""
    request_id, gold, score, objective = _validate(payload)
    row = find_request(gateway.db, request_id)
    if row is None:
        await gateway.writer.aflush(timeout=5.0)
        row = find_request(gateway.db, request_id)
    rt = gateway.rt
    if row is None or not _owned_by(row, caller, rt.settings.access.anonymous_feedback):
        raise not_found(f"No response with id {request_id!r} was served to this caller.", param="id")
    gold_text = rt.gold(row["route"], gold) if gold is not None else None
    await gateway.writer.submit(FeedbackLog({"request_id": request_id, "created": time.time(), "gold": gold_text,
                                             "score": score, "objective": objective}))
    result = {"id": request_id, "object": "feedback", "recorded": True}
    if gold_text is not None and row["aggregator"] == "mv":
        answers = completion_answers(gateway.db, request_id)
        credit = float(mv_credit(answers_to_counts(answers, gold_text)))
        correct = row["chosen_answer"] == gold_text
        gateway.metrics.accuracy.labels(row["route"], row["tier"], str(correct).lower()).inc()
        gateway.metrics.utility.labels(row["route"], row["tier"]).observe(
            credit - caller.tier.cost_weight * (row["cost"] or 0.0))
        result.update(correct=correct, credit=credit)
    return result
