"""The store's exceptions, and which SQLite failures mean "the store is unavailable"."""
from __future__ import annotations

import sqlite3
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from policies.budget import Cap


class StoreError(Exception):
    """Base of the store's own failures."""


class StoreUnavailable(StoreError):
    """The store could not be read or written (disk full, I/O error, locked beyond the busy timeout,
    the database server unreachable)."""


class Conflict(StoreError):
    """A write collided with a row that already has its key (unique or primary key)."""


class BudgetExhausted(Exception):
    """No room left under `cap` until `reset` (a decision, not a store failure: not a StoreError)."""

    def __init__(self, cap: Cap, reset: float, spent: float, limit: float, unit: str) -> None:
        self.cap, self.reset, self.spent, self.limit, self.unit = cap, reset, spent, limit, unit
        super().__init__(f"{cap.scope} {cap.window} cap of {_fmt(limit, unit)} reached "
                         f"({_fmt(spent, unit)} spent or reserved); resets at "
                         f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(reset))}")


def _fmt(value: float, unit: str) -> str:
    return f"${value:.4f}" if unit == "dollars" else f"{int(value)} tokens"


# Primary SQLite result codes of failures that can go away by themselves (or by an operator freeing
# disk): BUSY, LOCKED, NOMEM, READONLY, INTERRUPT, IOERR, CORRUPT, FULL, CANTOPEN, PROTOCOL, NOTADB.
_TRANSIENT_CODES = frozenset({5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 26})
_BUG_CLASSES = (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.DataError, sqlite3.InterfaceError,
                sqlite3.NotSupportedError)


def is_unavailable(exc: BaseException) -> bool:
    """True for failures of the storage itself (retry later); False for bad data or a bad statement."""
    if isinstance(exc, (OSError, MemoryError, StoreUnavailable)):
        return True
    if isinstance(exc, StoreError):
        return False
    if not isinstance(exc, sqlite3.DatabaseError) or isinstance(exc, _BUG_CLASSES):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    return code is None or (code & 0xFF) in _TRANSIENT_CODES
