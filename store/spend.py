"""Spend ledger in SQLite: reserve a request's worst case before the upstream call, settle after.

Shared by every worker process on the host and kept across restarts; each reservation checks and
books all of the request's caps in one BEGIN IMMEDIATE transaction, so concurrent requests can
never book past a cap.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import sqlite_utils

from policies.budget import Cap, affordable_n, window_bounds
from store.database import write_transaction


class BudgetExhausted(Exception):
    """No room left under `cap` until `reset`."""

    def __init__(self, cap: Cap, reset: float, spent: float, limit: float, unit: str) -> None:
        self.cap, self.reset, self.spent, self.limit, self.unit = cap, reset, spent, limit, unit
        super().__init__(f"{cap.scope} {cap.window} cap of {_fmt(limit, unit)} reached "
                         f"({_fmt(spent, unit)} spent or reserved); resets at "
                         f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(reset))}")


def _fmt(value: float, unit: str) -> str:
    return f"${value:.4f}" if unit == "dollars" else f"{int(value)} tokens"


@dataclass
class Reservation:
    rows: list[tuple[str, str, float]]  # (scope, window, window_start)
    n: int
    dollars: float
    tokens: int


class SpendLedger:
    def __init__(self, db: sqlite_utils.Database) -> None:
        self.db = db

    def _row(self, scope: str, window: str, start: float) -> tuple[float, int, float, int]:
        row = self.db.execute(
            "select dollars, tokens, reserved_dollars, reserved_tokens from spend where scope = ? and window = ?"
            " and window_start = ?", [scope, window, start]).fetchone()
        return tuple(row) if row else (0.0, 0, 0.0, 0)

    def reserve(self, caps: list[Cap], n: int, per_completion_dollars: float, per_completion_tokens: int,
                *, allow_fewer: bool, now: float | None = None) -> Reservation:
        """Book the worst case of n completions under every cap (or the largest n that fits, when
        `allow_fewer`); raises BudgetExhausted naming the first cap with no room for even one."""
        now = time.time() if now is None else now
        with write_transaction(self.db):
            bounds = [(cap, *window_bounds(cap.window, now)) for cap in caps]
            room, used = [], []
            for cap, start, _ in bounds:
                spent_d, spent_t, res_d, res_t = self._row(cap.scope, cap.window, start)
                used.append((spent_d + res_d, spent_t + res_t))
                room.append((None if cap.dollars is None else cap.dollars - spent_d - res_d,
                             None if cap.tokens is None else cap.tokens - spent_t - res_t))
            granted = affordable_n(n, per_completion_dollars=per_completion_dollars,
                                   per_completion_tokens=per_completion_tokens, room=room)
            if granted < (1 if allow_fewer else n):
                for (cap, start, reset), (d_left, t_left), (d_used, t_used) in zip(bounds, room, used):
                    need = 1 if allow_fewer else n
                    if cap.dollars is not None and d_left < need * per_completion_dollars:
                        raise BudgetExhausted(cap, reset, d_used, cap.dollars, "dollars")
                    if cap.tokens is not None and t_left < need * per_completion_tokens:
                        raise BudgetExhausted(cap, reset, t_used, cap.tokens, "tokens")
            dollars, tokens = granted * per_completion_dollars, granted * per_completion_tokens
            rows = []
            for cap, start, _ in bounds:
                self._add(cap.scope, cap.window, start, reserved_dollars=dollars, reserved_tokens=tokens)
                rows.append((cap.scope, cap.window, start))
        return Reservation(rows, granted, dollars, tokens)

    def settle(self, reservation: Reservation, dollars: float, tokens: int) -> None:
        """Release the reservation and book what the request really cost."""
        with write_transaction(self.db):
            for scope, window, start in reservation.rows:
                self._add(scope, window, start, dollars=dollars, tokens=tokens,
                          reserved_dollars=-reservation.dollars, reserved_tokens=-reservation.tokens)

    def record(self, scope: str, windows: tuple[str, ...], dollars: float, tokens: int, now: float | None = None) -> None:
        """Book spend without a cap (exploration), so it shows in the ledger and the metrics."""
        now = time.time() if now is None else now
        with write_transaction(self.db):
            for window in windows:
                self._add(scope, window, window_bounds(window, now)[0], dollars=dollars, tokens=tokens)

    def _add(self, scope: str, window: str, start: float, *, dollars: float = 0.0, tokens: int = 0,
             reserved_dollars: float = 0.0, reserved_tokens: int = 0) -> None:
        self.db.execute(
            "insert into spend (scope, window, window_start, dollars, tokens, reserved_dollars, reserved_tokens)"
            " values (?, ?, ?, ?, ?, ?, ?) on conflict (scope, window, window_start) do update set"
            " dollars = dollars + excluded.dollars, tokens = tokens + excluded.tokens,"
            " reserved_dollars = max(0, reserved_dollars + excluded.reserved_dollars),"
            " reserved_tokens = max(0, reserved_tokens + excluded.reserved_tokens)",
            [scope, window, start, dollars, tokens, reserved_dollars, reserved_tokens])

    def current(self, now: float | None = None) -> list[dict]:
        """Spend in every scope's current window (for gauges)."""
        now = time.time() if now is None else now
        rows = self.db.execute("select scope, window, window_start, dollars, tokens from spend").fetchall()
        return [{"scope": s, "window": w, "dollars": d, "tokens": t} for s, w, start, d, t in rows
                if window_bounds(w, now)[0] == start]
