"""Versioned serving policies: publish atomically, read the newest, list, diff, roll back."""
from __future__ import annotations

import time
from dataclasses import dataclass

from policies.arms import Arm, Policy, RankedArm
from store.database import Database, write_transaction


@dataclass(frozen=True)
class PolicyEntry:
    """One (route, tier) row of a policy version, with what training estimated for it."""

    route: str
    tier: str
    arm: Arm
    value: float | None = None
    value_se: float | None = None
    budget_spent: int | None = None
    ranked: tuple[RankedArm, ...] = ()


class PolicyStore:
    """Reads and writes the `policies` / `policy_versions` tables."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def latest_version(self) -> int:
        row = self.db.execute("select max(version) from policy_versions").fetchone()
        return int(row[0] or 0)

    def load(self, version: int | None = None) -> Policy:
        """The given version (default: newest) as a Policy; version 0 (empty) when none exists."""
        version = self.latest_version() if version is None else version
        if version == 0:
            return Policy()
        rows = self.db.execute(
            "select route, tier, prompt_id, n, stop from policies where version = ?", [version]
        ).fetchall()
        return Policy(version=version, arms={(r, t): Arm(p, int(n), s) for r, t, p, n, s in rows},
                      ranked=self._ranked(version))

    def _ranked(self, version: int) -> dict[tuple[str, str], tuple[RankedArm, ...]]:
        ranked: dict[tuple[str, str], list[RankedArm]] = {}
        for r, t, p, n, v, se, c in self.db.execute(
                "select route, tier, prompt_id, n, value, value_se, cost from policy_arms where version = ?"
                " order by route, tier, rank", [version]).fetchall():
            ranked.setdefault((r, t), []).append(RankedArm(p, int(n), _f(v), _f(se), _f(c)))
        return {k: tuple(v) for k, v in ranked.items()}

    def entries(self, version: int) -> list[PolicyEntry]:
        rows = self.db.execute(
            "select route, tier, prompt_id, n, value, value_se, budget_spent, stop from policies"
            " where version = ? order by route, tier", [version]
        ).fetchall()
        ranked = self._ranked(version)
        return [PolicyEntry(r, t, Arm(p, int(n), s), v, se, b, ranked.get((r, t), ()))
                for r, t, p, n, v, se, b, s in rows]

    def versions(self) -> list[dict]:
        return self.db.query("select * from policy_versions order by version")

    def publish(self, entries: list[PolicyEntry], *, run_id: str = "", note: str = "",
                base_version: int | None = None) -> int:
        """Write a new version in one transaction: rows of `base_version` not overridden carry over."""
        now = time.time()
        with write_transaction(self.db, "iapo:policy"):
            version = self.latest_version() + 1
            base = self.entries(self.latest_version() if base_version is None else base_version)
            merged = {(e.route, e.tier): e for e in base}
            merged.update({(e.route, e.tier): e for e in entries})
            self.db.insert("policy_versions", [{"version": version, "created": now, "run_id": run_id, "note": note}])
            self.db.insert("policies", [
                {
                    "version": version, "route": e.route, "tier": e.tier, "prompt_id": e.arm.prompt_id,
                    "n": e.arm.n, "value": e.value, "value_se": e.value_se, "budget_spent": e.budget_spent,
                    "created": now, "run_id": run_id, "stop": e.arm.stop,
                }
                for e in merged.values()
            ])
            self.db.insert("policy_arms", [
                {"version": version, "route": e.route, "tier": e.tier, "rank": i, "prompt_id": a.prompt_id, "n": a.n,
                 "value": _none(a.value), "value_se": _none(a.value_se), "cost": _none(a.cost)}
                for e in merged.values() for i, a in enumerate(e.ranked)
            ])
        return version

    def rollback(self, to_version: int) -> int:
        """Publish a copy of an older version as the newest one (history stays append-only)."""
        if to_version < 0 or (to_version != 0 and not self.entries(to_version)):
            raise PolicyVersionMissing(f"policy version {to_version} does not exist "
                                       f"(the newest is {self.latest_version()})")
        return self.publish([], note=f"rollback to {to_version}", base_version=to_version)


class PolicyVersionMissing(KeyError):
    """A version that was never published."""

    def __str__(self) -> str:
        return str(self.args[0])


def _f(x) -> float:
    return float("nan") if x is None else float(x)


def _none(x: float) -> float | None:
    return None if x is None or x != x else float(x)
