"""Spend ledger: reserve a request's worst case before the upstream call, settle after.

Shared by every worker process and replica on the store, and kept across restarts. A reservation is
one row per cap window in `reservations`, with an expiry. The room under a cap is its limit minus the
spend minus the live (unexpired) reservations, computed in the transaction that books the new
reservation, which is serialised with every other booking on the same cap windows (SQLite: BEGIN
IMMEDIATE; PostgreSQL: an advisory lock per cap window): concurrent requests never book past a cap,
and a reservation whose owner died (kill -9) stops counting the instant it expires, swept or not.
"""
from __future__ import annotations

import contextlib
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Iterator

from policies.budget import WINDOWS, Cap, affordable_n, window_bounds
from store.database import Database, set_busy_timeout, write_transaction
from store.errors import BudgetExhausted, StoreUnavailable

__all__ = ["BudgetExhausted", "Reservation", "SpendLedger", "StoreUnavailable"]

DEFAULT_TTL_S = 300.0  # expiry of a reservation when the caller gives none
SETTLED_MEMORY_S = 86_400.0  # how long settled ids are remembered (a retried settle is a no-op)


@dataclass
class Reservation:
    """What `reserve` booked: the cap windows it holds, how many completions, and until when."""

    rows: list[tuple[str, str, float]]  # (scope, window, window_start)
    n: int
    dollars: float
    tokens: int
    id: str = ""
    owner: str = ""
    expires_at: float = 0.0


class SpendLedger:
    """Reserve / settle / sweep over the `spend` and `reservations` tables; safe to share across threads."""

    def __init__(self, db: Database, *, busy_timeout: float | None = None) -> None:
        self.db = db
        self._lock = threading.Lock()
        if busy_timeout is not None:
            set_busy_timeout(db, busy_timeout)

    @contextlib.contextmanager
    def _transaction(self, *windows: tuple[str, str, float]) -> Iterator[None]:
        """One write transaction, serialised with every other one touching the same cap windows."""
        with self._lock, write_transaction(self.db, *(f"cap:{s}:{w}:{start!r}" for s, w, start in windows)):
            yield

    def _read(self, sql: str, params: list) -> list[tuple]:
        with self._lock:
            return self.db.execute(sql, params).fetchall()

    @staticmethod
    def _windows(caps: list[Cap], now: float) -> list[tuple[str, str, float]]:
        return [(cap.scope, cap.window, window_bounds(cap.window, now)[0]) for cap in caps]

    def _used(self, scope: str, window: str, start: float, now: float) -> tuple[float, int]:
        """Spent plus live reservations in one cap window (call inside the write transaction)."""
        key = [scope, window, start]
        spent = self.db.execute("select dollars, tokens from spend where scope = ? and \"window\" = ? and window_start = ?",
                                key).fetchone() or (0.0, 0)
        held = self.db.execute("select coalesce(sum(dollars), 0), coalesce(sum(tokens), 0) from reservations"
                               " where scope = ? and \"window\" = ? and window_start = ? and expires > ?",
                               key + [now]).fetchone()
        return (spent[0] or 0.0) + held[0], (spent[1] or 0) + held[1]

    def reserve(self, caps: list[Cap], n: int, per_completion_dollars: float, per_completion_tokens: int,
                *, allow_fewer: bool, owner: str = "", expires_at: float | None = None,
                reservation_id: str | None = None, now: float | None = None) -> Reservation:
        """Book the worst case of n completions under every cap until `expires_at` (default now + 300 s),
        or the largest n that fits when `allow_fewer`; raises BudgetExhausted naming the first cap
        with no room, StoreUnavailable when SQLite fails, ValueError for a reservation id already used."""
        now = time.time() if now is None else now
        need = 1 if allow_fewer else n
        with self._transaction(*self._windows(caps, now)):
            bounds, used, room = self._room(caps, now, reservation_id)
            granted = affordable_n(n, per_completion_dollars=per_completion_dollars,
                                   per_completion_tokens=per_completion_tokens, room=room)
            if granted < need:
                raise self._exhausted(bounds, room, used, need, per_completion_dollars, per_completion_tokens)
            return self._book(bounds, granted, per_completion_dollars, per_completion_tokens, owner, expires_at,
                              reservation_id, now)

    def _room(self, caps: list[Cap], now: float, reservation_id: str | None):
        """Inside the write transaction: each cap's window bounds, what is used, and what room is left."""
        if reservation_id is not None and self._known(reservation_id):
            raise ValueError(f"reservation id {reservation_id!r} was already used")
        bounds = [(cap, *window_bounds(cap.window, now)) for cap in caps]
        used = [self._used(cap.scope, cap.window, start, now) for cap, start, _ in bounds]
        room = [(None if cap.dollars is None else cap.dollars - d, None if cap.tokens is None else cap.tokens - t)
                for (cap, _, _), (d, t) in zip(bounds, used)]
        return bounds, used, room

    def _book(self, bounds, n: int, per_dollars: float, per_tokens: int, owner: str, expires_at: float | None,
              reservation_id: str | None, now: float) -> Reservation:
        """Inside the write transaction: insert the reservation's rows, one per cap window."""
        expires_at = now + DEFAULT_TTL_S if expires_at is None else expires_at
        reservation_id = reservation_id or uuid.uuid4().hex
        dollars, tokens = n * per_dollars, n * per_tokens
        rows = list(dict.fromkeys((cap.scope, cap.window, start) for cap, start, _ in bounds))
        self.db.insert("reservations", [
            {"id": reservation_id, "scope": scope, "window": window, "window_start": start, "dollars": dollars,
             "tokens": tokens, "owner": owner, "expires": expires_at} for scope, window, start in rows])
        return Reservation(rows, n, dollars, tokens, reservation_id, owner, expires_at)

    def reserve_first(self, caps: list[Cap], options: list[tuple[int, float, int]], *, owner: str = "",
                      expires_at: float | None = None, reservation_id: str | None = None,
                      now: float | None = None) -> tuple[int, Reservation]:
        """Book the first of `options` (n, per-completion dollars, per-completion tokens) whose whole worst
        case fits every cap, in one transaction; returns its index and reservation. BudgetExhausted
        (naming the first option's cap) when none fits."""
        now = time.time() if now is None else now
        with self._transaction(*self._windows(caps, now)):
            bounds, used, room = self._room(caps, now, reservation_id)
            for index, (n, per_dollars, per_tokens) in enumerate(options):
                if affordable_n(n, per_completion_dollars=per_dollars, per_completion_tokens=per_tokens, room=room) >= n:
                    return index, self._book(bounds, n, per_dollars, per_tokens, owner, expires_at, reservation_id, now)
            n, per_dollars, per_tokens = options[0]
            raise self._exhausted(bounds, room, used, n, per_dollars, per_tokens)

    @staticmethod
    def _exhausted(bounds, room, used, need: int, per_dollars: float, per_tokens: int) -> BudgetExhausted:
        """The first cap without room for `need` completions."""
        for (cap, _, reset), (d_left, t_left), (d_used, t_used) in zip(bounds, room, used):
            if cap.dollars is not None and d_left < need * per_dollars:
                return BudgetExhausted(cap, reset, d_used, cap.dollars, "dollars")
            if cap.tokens is not None and t_left < need * per_tokens:
                return BudgetExhausted(cap, reset, t_used, cap.tokens, "tokens")
        cap, _, reset = bounds[0]  # only rounding can get here: name the first cap
        unit = "dollars" if cap.dollars is not None else "tokens"
        return BudgetExhausted(cap, reset, used[0][0 if unit == "dollars" else 1],
                               cap.dollars if unit == "dollars" else cap.tokens, unit)

    def _known(self, reservation_id: str) -> bool:
        return self.db.execute("select 1 from reservations where id = ? union all"
                               " select 1 from settled_reservations where id = ? limit 1",
                               [reservation_id, reservation_id]).fetchone() is not None

    def settle(self, reservation: Reservation, dollars: float, tokens: int) -> bool:
        """Drop the reservation and book the real cost in the windows it reserved, exactly once per id
        (also after it expired or was swept); False when this id was already settled."""
        with self._transaction(*reservation.rows):
            first = self.db.execute("insert into settled_reservations (id, settled) values (?, ?)"
                                    " on conflict (id) do nothing", [reservation.id, time.time()]).rowcount == 1
            self.db.execute("delete from reservations where id = ?", [reservation.id])
            if first:
                for scope, window, start in reservation.rows:
                    self._add(scope, window, start, dollars, tokens)
        return first

    def release_expired(self, now: float | None = None) -> int:
        """Delete expired reservations (their owners never settled); returns how many were released."""
        now = time.time() if now is None else now
        with self._transaction():
            count = self.db.execute("select count(distinct id) from reservations where expires <= ?", [now]).fetchone()[0]
            self.db.execute("delete from reservations where expires <= ?", [now])
            self.db.execute("delete from settled_reservations where settled < ?", [now - SETTLED_MEMORY_S])
        return int(count)

    def record(self, scope: str, windows: tuple[str, ...], dollars: float, tokens: int, now: float | None = None) -> None:
        """Book spend without a cap (exploration), so it shows in the ledger and the metrics."""
        now = time.time() if now is None else now
        rows = [(scope, window, window_bounds(window, now)[0]) for window in windows]
        with self._transaction(*rows):
            for row in rows:
                self._add(*row, dollars, tokens)

    def _add(self, scope: str, window: str, start: float, dollars: float, tokens: int) -> None:
        self.db.execute(
            "insert into spend (scope, \"window\", window_start, dollars, tokens) values (?, ?, ?, ?, ?)"
            " on conflict (scope, \"window\", window_start) do update set"
            " dollars = spend.dollars + excluded.dollars, tokens = spend.tokens + excluded.tokens",
            [scope, window, start, dollars, tokens])

    def current(self, now: float | None = None) -> list[dict]:
        """Spend in every scope's current window (for gauges): only the current windows' rows are read."""
        now = time.time() if now is None else now
        starts = {w: window_bounds(w, now)[0] for w in WINDOWS}
        rows = self._read("select scope, \"window\", window_start, dollars, tokens from spend where "
                          + " or ".join("(\"window\" = ? and window_start = ?)" for _ in starts),
                          [v for item in starts.items() for v in item])
        return [{"scope": s, "window": w, "dollars": d, "tokens": t} for s, w, start, d, t in rows]

    def prune(self, now: float | None = None) -> int:
        """Forget spend rows of windows long past (minutes after an hour, days after 40 days, months after
        400 days): the table stays small however many keys and minutes go by."""
        now = time.time() if now is None else now
        with self._transaction():
            cursor = self.db.execute(
                "delete from spend where (\"window\" = 'per_minute' and window_start < ?)"
                " or (\"window\" = 'per_day' and window_start < ?) or (\"window\" = 'per_month' and window_start < ?)",
                [now - 3600, now - 40 * 86400, now - 400 * 86400])
            return cursor.rowcount

    def reserved(self, now: float | None = None) -> list[dict]:
        """Live (unexpired) reserved dollars and tokens per scope in its current windows (metrics, health)."""
        now = time.time() if now is None else now
        rows = self._read("select scope, \"window\", window_start, sum(dollars), sum(tokens), count(*) from reservations"
                          " where expires > ? group by scope, \"window\", window_start", [now])
        return [{"scope": s, "window": w, "dollars": d, "tokens": t, "reservations": k}
                for s, w, start, d, t, k in rows if window_bounds(w, now)[0] == start]
