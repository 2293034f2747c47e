"""The operator's console as a library: what the admin API, the /ui pages and the `iapo` CLI show and
do (keys, spend against caps, policy versions, training runs, recent requests, the config). Functions
return plain values and raise `ConsoleError`; the edges choose statuses, exit codes and pages."""
from __future__ import annotations

import json
import math
import time
import uuid
from collections import Counter

from gateway.config import Settings
from policies.budget import WINDOWS, window_bounds
from store.database import Database, write_transaction
from store.errors import Conflict
from store.keys import KeyRecord, KeyStore, key_id
from store.policy_store import PolicyStore, PolicyVersionMissing
from store.spend import SpendLedger
from store.training_runs import TrainingRuns

SECRET_FIELDS = ("api_key", "secret", "password", "token")


class ConsoleError(Exception):
    """A refused console action: `status` is the HTTP status the admin API answers with."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.status, self.code = status, code


# -- keys -------------------------------------------------------------------------------------------
def create_key(keys: KeyStore, settings: Settings, *, tier: str | None, name: str | None = None,
               admin: bool = False, models: list[str] | None = None, caps: dict | None = None) -> tuple[str, KeyRecord]:
    """A caller key (a tier, optionally its own models and caps) or an admin key; the secret once."""
    if not admin and tier not in {t.name for t in settings.tiers}:
        raise ConsoleError(f"tier {tier!r} is not one of {[t.name for t in settings.tiers]}", code="unknown_tier")
    if models is not None and not (isinstance(models, list) and all(isinstance(m, str) for m in models)):
        raise ConsoleError("models must be a list of model names or patterns", code="invalid_type")
    if caps is not None:
        _check_caps(caps)
    try:
        return keys.create(tier, name or "", role="admin" if admin else "caller", models=models, caps=caps)
    except Conflict as exc:
        raise ConsoleError(str(exc), status=409, code="key_name_taken") from None


def _check_caps(caps) -> None:
    if not isinstance(caps, dict) or not caps:
        raise ConsoleError("caps must map windows (per_minute, per_day, per_month) to {dollars, tokens}")
    for window, limit in caps.items():
        if window not in WINDOWS:
            raise ConsoleError(f"unknown cap window {window!r}; expected one of {list(WINDOWS)}")
        if not isinstance(limit, dict) or not limit or set(limit) - {"dollars", "tokens"} or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in limit.values()):
            raise ConsoleError(f"caps.{window} must be {{dollars and/or tokens}} with positive numbers")


def revoke_key(keys: KeyStore, name_or_id: str) -> int:
    revoked = keys.revoke(name_or_id)
    if not revoked:
        raise ConsoleError(f"no active key named {name_or_id!r} (or with that id)", status=404, code="key_not_found")
    return revoked


# -- spend ------------------------------------------------------------------------------------------
def spend_report(ledger: SpendLedger, settings: Settings, keys: KeyStore, now: float | None = None) -> list[dict]:
    """Every tier cap and key cap in its current window: spent, reserved, limit, share used, reset time
    (the ledger's own figures), plus uncapped spend the ledger holds (exploration, uncapped tiers)."""
    now = time.time() if now is None else now
    spent = {(r["scope"], r["window"]): r for r in ledger.current(now)}
    held = {(r["scope"], r["window"]): r for r in ledger.reserved(now)}
    names = {k.id: k for k in keys.list()}
    rows, seen = [], set()

    def row(scope: str, kind: str, name: str, window: str, limit) -> dict:
        seen.add((scope, window))
        s, h = spent.get((scope, window), {}), held.get((scope, window), {})
        dollars, tokens = s.get("dollars", 0.0), s.get("tokens", 0)
        cap_d = getattr(limit, "dollars", None) if limit is not None and not isinstance(limit, dict) else \
            (limit or {}).get("dollars")
        cap_t = getattr(limit, "tokens", None) if limit is not None and not isinstance(limit, dict) else \
            (limit or {}).get("tokens")
        used = [x for x in ((dollars + h.get("dollars", 0.0)) / cap_d if cap_d else None,
                            (tokens + h.get("tokens", 0)) / cap_t if cap_t else None) if x is not None]
        return {"scope": kind, "name": name, "window": window, "dollars": dollars, "tokens": tokens,
                "reserved_dollars": h.get("dollars", 0.0), "cap_dollars": cap_d, "cap_tokens": cap_t,
                "used_ratio": max(used) if used else None, "resets_at": window_bounds(window, now)[1]}

    for tier in settings.tiers:
        for window, limit in tier.caps.items():
            rows.append(row(f"tier:{tier.name}", "tier", tier.name, window, limit))
    configured = [(key_id(k.hash), k.name or key_id(k.hash), k.tier, None) for k in settings.api_keys]
    stored = [(r.id, r.name, r.tier, r.caps) for r in names.values() if r.role == "caller" and r.tier is not None]
    for ident, name, tier_name, own_caps in configured + stored:
        tier = next((t for t in settings.tiers if t.name == tier_name), None)
        limits = own_caps if own_caps is not None else (tier.key_caps if tier else {})
        for window, limit in limits.items():
            rows.append(row(f"key:{ident}", "key", name, window, limit))
    for (scope, window) in sorted(set(spent) - seen):
        kind, _, name = scope.partition(":")
        rows.append(row(scope, kind, names[name].name if kind == "key" and name in names else name, window, None))
    return rows


# -- policies ---------------------------------------------------------------------------------------
def policy_versions(store: PolicyStore) -> list[dict]:
    return store.versions()


def policy_view(store: PolicyStore, version: int | None = None) -> dict:
    """One version: per (route, tier) the served arm with its estimate, and its ranked alternatives."""
    latest = store.latest_version()
    version = latest if version is None else version
    if version < 0 or version > latest or (version and not store.entries(version)):
        raise ConsoleError(f"policy version {version} does not exist (the newest is {latest})", 404,
                           "version_not_found")
    return {"version": version, "latest": latest, "entries": [
        {"route": e.route, "tier": e.tier, "prompt_id": e.arm.prompt_id, "n": e.arm.n, "stop": e.arm.stop,
         "value": _num(e.value),
         "value_se": _num(e.value_se), "budget_spent": e.budget_spent,
         "ranked": [{"prompt_id": a.prompt_id, "n": a.n, "value": _num(a.value), "value_se": _num(a.value_se),
                     "cost": _num(a.cost)} for a in e.ranked]} for e in store.entries(version)]}


def policy_diff(store: PolicyStore, a: int, b: int) -> list[dict]:
    left = {(e["route"], e["tier"]): e for e in policy_view(store, a)["entries"]}
    right = {(e["route"], e["tier"]): e for e in policy_view(store, b)["entries"]}
    out = []
    for key in sorted(set(left) | set(right)):
        old, new = left.get(key), right.get(key)
        arm = (lambda e: None if e is None else {"prompt_id": e["prompt_id"], "n": e["n"], "value": e["value"]})
        if arm(old) != arm(new):
            out.append({"route": key[0], "tier": key[1], "from": arm(old), "to": arm(new)})
    return out


def rollback(store: PolicyStore, version: int) -> int:
    try:
        return store.rollback(version)
    except PolicyVersionMissing as exc:
        raise ConsoleError(str(exc), 404, "version_not_found") from None


# -- training ---------------------------------------------------------------------------------------
def training_runs(runs: TrainingRuns, route: str | None = None, limit: int = 50) -> list[dict]:
    return [_run(r) for r in runs.list(route, limit)]


def training_run(runs: TrainingRuns, run_id: str) -> dict:
    run = runs.get(run_id)
    if run is None:
        raise ConsoleError(f"no training run {run_id!r}", 404, "run_not_found")
    return {**_run(run), "queries": len(run.queries)}


def _run(run) -> dict:
    report = run.report or {}
    return {"run_id": run.run_id, "route": run.route, "status": run.status, "started": run.started,
            "finished": run.finished, "budget": run.budget, "spent": run.spent, "dollars": run.dollars,
            "version": report.get("version"), "message": report.get("message"),
            "reused_completions": report.get("saved_completions", 0),
            "replayed_completions": report.get("replayed_completions", 0),
            "trajectory": report.get("trajectory", {}), "curves": report.get("curves", {}),
            "changes": report.get("changes", [])}


# -- requests ---------------------------------------------------------------------------------------
def recent_requests(db: Database, *, route: str | None = None, tier: str | None = None, status: int | None = None,
                    kind: str | None = None, limit: int = 50) -> list[dict]:
    where, params = [], []
    for column, value in (("route", route), ("tier", tier), ("status", status), ("kind", kind)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    clause = f"where {' and '.join(where)}" if where else ""
    return db.query(f"select id, created, kind, endpoint, route, tier, upstream, prompt_id, n, aggregator, status,"
                    f" chosen_index, chosen_answer, vote_share, cost, latency_s, error from requests {clause}"
                    f" order by created desc limit ?", [*params, max(1, min(int(limit), 500))])


def request_detail(db: Database, request_id: str) -> dict:
    """A request with its N completions: each one's answer (and the vote count) or scores, and which
    one was returned."""
    rows = db.query("select * from requests where id = ?", [request_id])
    if not rows:
        raise ConsoleError(f"no request {request_id!r}", 404, "request_not_found")
    request = rows[0]
    completions = db.query("select idx, text, answer, scores, prompt_tokens, completion_tokens, cost, finish_reason,"
                           " error from completions where request_id = ? order by idx", [request_id])
    votes = Counter(c["answer"] for c in completions if c["answer"] is not None)
    for c in completions:
        c["scores"] = json.loads(c["scores"]) if c["scores"] else None
        c["votes"] = votes.get(c["answer"]) if c["answer"] is not None else None
        c["chosen"] = c["idx"] == request.get("chosen_index")
    request.pop("messages", None)
    return {"request": request, "completions": completions, "votes": dict(votes)}


# -- config, audit ----------------------------------------------------------------------------------
def config_view(settings: Settings) -> dict:
    """The running config with secrets redacted (key hashes, and any field that looks like a secret)."""
    data = settings.model_dump(mode="json")
    data["api_keys"] = [{"tier": k["tier"], "name": k["name"], "hash": "redacted"} for k in data["api_keys"]]
    data["admin_keys"] = [{"name": k["name"], "hash": "redacted"} for k in data["admin_keys"]]
    return _redact(data)


def _redact(value):
    if isinstance(value, dict):
        return {k: "redacted" if any(s in k.lower() for s in SECRET_FIELDS) and k != "api_key_env" and value[k]
                else _redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    if isinstance(value, str) and value.startswith(("postgresql://", "postgres://")) and "@" in value:
        return value.split("://", 1)[0] + "://redacted@" + value.rsplit("@", 1)[1]
    return value


def record_action(db: Database, admin: str, action: str, target: str, detail: dict | None = None) -> None:
    """Every console action is kept with the name of the admin key that took it."""
    with write_transaction(db):
        db.insert("admin_actions", [{"id": uuid.uuid4().hex, "created": time.time(), "admin": admin, "action": action,
                                     "target": target, "detail": json.dumps(detail or {})}])


def admin_actions(db: Database, limit: int = 100) -> list[dict]:
    return db.query("select created, admin, action, target, detail from admin_actions order by created desc limit ?",
                    [limit])


def _num(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x
