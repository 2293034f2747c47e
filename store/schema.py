"""The store's tables as they are at the newest version, declared once.

PostgreSQL databases are created from this declaration (`store.postgres_backend`); SQLite files reach
the same shape through their own migration steps (`store.sqlite_backend`), and a test holds the two
to the same columns. A new column or table is a migration step on both backends plus a line here.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Table:
    columns: dict[str, type]
    key: tuple[str, ...]
    indexes: tuple[tuple[str, ...], ...] = ()
    references: tuple[tuple[str, str, str], ...] = ()  # (column, table, column)
    defaults: dict[str, object] = field(default_factory=dict)


TABLES: dict[str, Table] = {
    "requests": Table(
        {"id": str, "created": float, "kind": str, "route": str, "tier": str, "upstream": str, "policy_version": int,
         "prompt_id": str, "prompt_version": str, "n": int, "aggregator": str, "messages": str, "query_key": str,
         "chosen_index": int, "chosen_answer": str, "tie_size": int, "vote_share": float, "prompt_tokens": int,
         "completion_tokens": int, "cost": float, "latency_s": float, "upstream_latency_s": float, "failed": int,
         "status": int, "error": str, "run_id": str, "key_id": str, "endpoint": str, "upstream_id": str,
         "run_pull": int, "waves": int},
        ("id",), (("route", "created"), ("kind", "route"), ("run_id", "run_pull"))),
    "completions": Table(
        {"request_id": str, "idx": int, "text": str, "answer": str, "scores": str, "prompt_tokens": int,
         "completion_tokens": int, "cost": float, "finish_reason": str, "latency_s": float, "error": str},
        ("request_id", "idx"), references=(("request_id", "requests", "id"),)),
    "feedback": Table(
        {"request_id": str, "target": str, "created": float, "gold": str, "score": float, "objective": str},
        ("request_id", "target")),
    "policy_versions": Table({"version": int, "created": float, "run_id": str, "note": str}, ("version",)),
    "policies": Table(
        {"version": int, "route": str, "tier": str, "prompt_id": str, "n": int, "value": float, "value_se": float,
         "budget_spent": int, "created": float, "run_id": str, "stop": str},
        ("version", "route", "tier")),
    "policy_arms": Table(
        {"version": int, "route": str, "tier": str, "rank": int, "prompt_id": str, "n": int, "value": float,
         "value_se": float, "cost": float},
        ("version", "route", "tier", "rank")),
    "spend": Table(
        {"scope": str, "window": str, "window_start": float, "dollars": float, "tokens": int,
         "reserved_dollars": float, "reserved_tokens": int},
        ("scope", "window", "window_start"),
        defaults={"dollars": 0.0, "tokens": 0, "reserved_dollars": 0.0, "reserved_tokens": 0}),
    "reservations": Table(
        {"id": str, "scope": str, "window": str, "window_start": float, "dollars": float, "tokens": int,
         "owner": str, "expires": float},
        ("id", "scope", "window", "window_start"), (("scope", "window", "window_start", "expires"),)),
    "settled_reservations": Table({"id": str, "settled": float}, ("id",), (("settled",),)),
    "api_keys": Table({"hash": str, "tier": str, "name": str, "created": float, "revoked": float, "role": str,
                       "models": str, "caps": str}, ("hash",)),
    "admin_actions": Table({"id": str, "created": float, "admin": str, "action": str, "target": str, "detail": str},
                           ("id",), (("created",),)),
    "training_locks": Table(
        {"route": str, "run_id": str, "pid": int, "acquired": float, "host": str, "expires": float}, ("route",)),
    "training_batches": Table(
        {"run_id": str, "round": int, "batch_id": str, "status": str, "submitted": float, "completed": float,
         "requests": int},
        ("run_id", "round")),
    "training_runs": Table(
        {"run_id": str, "route": str, "status": str, "started": float, "finished": float, "fingerprint": str,
         "budget": int, "spent": int, "dollars": float, "queries": str, "report": str},
        ("run_id",), (("route", "started"),)),
}
