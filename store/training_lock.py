"""One training run per route at a time: a row in `training_locks`, taken over only when stale."""
from __future__ import annotations

import os
import sqlite3
import time

import sqlite_utils

from store.database import write_transaction


class TrainingLockHeld(Exception):
    """Another live training run holds the route."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class TrainingLock:
    def __init__(self, db: sqlite_utils.Database, route: str, run_id: str) -> None:
        self.db, self.route, self.run_id = db, route, run_id

    def acquire(self) -> None:
        with write_transaction(self.db):
            row = self.db.execute("select run_id, pid from training_locks where route = ?", [self.route]).fetchone()
            if row is not None:
                run_id, pid = row
                if _alive(pid) and run_id != self.run_id:
                    raise TrainingLockHeld(f"route {self.route!r} is being trained by run {run_id} (pid {pid})")
                self.db.execute("delete from training_locks where route = ?", [self.route])
            try:
                self.db["training_locks"].insert(
                    {"route": self.route, "run_id": self.run_id, "pid": os.getpid(), "acquired": time.time()})
            except sqlite3.IntegrityError:
                raise TrainingLockHeld(f"route {self.route!r} is being trained by another run") from None

    def release(self) -> None:
        with write_transaction(self.db):
            self.db.execute("delete from training_locks where route = ? and run_id = ?", [self.route, self.run_id])
