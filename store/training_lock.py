"""One training run per route across every process and replica on the store: a lease row in
`training_locks`, renewed by its run, taken over when it expired (or, on the same host, when the
process that holds it is gone)."""
from __future__ import annotations

import os
import socket
import time

from store.database import Database, write_transaction
from store.errors import Conflict

LEASE_S = 120.0  # a run renews its lease at least this often; a lease not renewed for this long is stale


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
    def __init__(self, db: Database, route: str, run_id: str) -> None:
        self.db, self.route, self.run_id = db, route, run_id
        self.host = socket.gethostname()

    def acquire(self) -> None:
        now = time.time()
        with write_transaction(self.db, f"training:{self.route}"):
            rows = self.db.query("select run_id, pid, host, expires from training_locks where route = ?", [self.route])
            if rows:
                held = rows[0]
                stale = (held["expires"] is not None and held["expires"] < now) or \
                    (held["host"] in (None, self.host) and not _alive(held["pid"]))
                if held["run_id"] != self.run_id and not stale:
                    raise TrainingLockHeld(f"route {self.route!r} is being trained by run {held['run_id']} "
                                           f"(pid {held['pid']} on {held['host'] or 'this host'})")
                self.db.execute("delete from training_locks where route = ?", [self.route])
            try:
                self.db.insert("training_locks", [{"route": self.route, "run_id": self.run_id, "pid": os.getpid(),
                                                   "acquired": now, "host": self.host, "expires": now + LEASE_S}])
            except Conflict:
                raise TrainingLockHeld(f"route {self.route!r} is being trained by another run") from None

    def renew(self) -> None:
        """Extend the lease (the run calls this as it goes)."""
        with write_transaction(self.db):
            self.db.execute("update training_locks set expires = ? where route = ? and run_id = ?",
                            [time.time() + LEASE_S, self.route, self.run_id])

    def release(self) -> None:
        with write_transaction(self.db):
            self.db.execute("delete from training_locks where route = ? and run_id = ?", [self.route, self.run_id])
