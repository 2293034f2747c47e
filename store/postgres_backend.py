"""The PostgreSQL backend: a pooled psycopg 3 connection per process and URL, the schema created from
`store.schema`, and the `Database` operations the store uses.

Writers that must see one another (reservations under a cap, publishing a policy version, taking a
training lock) name lock keys: each becomes a transaction-scoped advisory lock, taken in sorted order,
so those transactions are serialised across every replica on the database. Statements outside a
transaction run in autocommit. Driver failures become `StoreUnavailable` (connection, timeouts, disk)
or `Conflict` (a key that exists).
"""
from __future__ import annotations

import contextlib
import hashlib
import threading
from functools import lru_cache
from typing import Iterator

from store.errors import Conflict, StoreUnavailable
from store.result import Result, SharedOperations
from store.schema import TABLES, Table

POOL_MAX = 16
_pools: dict[str, object] = {}
_pools_lock = threading.Lock()
TYPES = {str: "TEXT", int: "BIGINT", float: "DOUBLE PRECISION"}
SCHEMA_LOCK = "iapo:schema"


def _pool(url: str, lock_timeout_s: float):
    """One connection pool per URL in this process, shared by every component that opens the store."""
    from psycopg_pool import ConnectionPool

    with _pools_lock:
        pool = _pools.get(url)
        if pool is None:
            options = f"-c lock_timeout={int(lock_timeout_s * 1000)} -c idle_in_transaction_session_timeout=60000"
            pool = ConnectionPool(url, min_size=1, max_size=POOL_MAX, open=True, timeout=lock_timeout_s,
                                  kwargs={"autocommit": True, "options": options}, name="iapo-store",
                                  configure=_configure)
            _pools[url] = pool
        return pool


def _configure(conn) -> None:
    """NUMERIC (what sum() of a BIGINT gives) as int or float, like SQLite, never Decimal."""
    from psycopg.adapt import Loader

    class NumericLoader(Loader):
        def load(self, data):
            text = bytes(data).decode()
            return int(text) if text.lstrip("-").isdigit() else float(text)

    conn.adapters.register_loader("numeric", NumericLoader)


@lru_cache(maxsize=512)
def _pg(sql: str) -> str:
    """The store writes `?` placeholders (SQLite's); psycopg wants `%s` (and a literal `%` doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


def lock_id(key: str) -> int:
    """A stable signed 64-bit advisory lock id for a key."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)


class PostgresDatabase(SharedOperations):
    """The store on a PostgreSQL database; safe to share across threads (each transaction holds its own
    pooled connection for the thread that runs it)."""

    dialect = "postgres"

    def __init__(self, url: str, *, busy_timeout: float = 30.0) -> None:
        self.url = url
        try:
            self.pool = _pool(url, busy_timeout)
        except Exception as exc:
            raise _mapped(exc) from exc
        self._local = threading.local()

    @contextlib.contextmanager
    def _connection(self):
        conn = getattr(self._local, "conn", None)
        if conn is not None:  # inside this thread's transaction
            yield conn
            return
        with self.pool.connection() as conn:
            yield conn

    def execute(self, sql: str, params=()) -> Result:
        try:
            with self._connection() as conn:
                cursor = conn.execute(_pg(sql), list(params))
                columns = [d.name for d in cursor.description] if cursor.description else []
                return Result(cursor.fetchall() if columns else [], cursor.rowcount, columns)
        except Exception as exc:
            raise _mapped(exc) from exc

    def executemany(self, sql: str, rows) -> None:
        try:
            with self._connection() as conn, conn.cursor() as cursor:
                cursor.executemany(_pg(sql), list(rows))
        except Exception as exc:
            raise _mapped(exc) from exc

    @contextlib.contextmanager
    def transaction(self, *locks: str) -> Iterator["PostgresDatabase"]:
        """One transaction on a pooled connection held by this thread; each lock key is taken as an
        advisory lock (sorted, so two transactions never wait on each other in a cycle)."""
        if getattr(self._local, "conn", None) is not None:
            raise RuntimeError("nested store transactions")
        try:
            with self.pool.connection() as conn, conn.transaction():
                self._local.conn = conn
                try:
                    for key in sorted(set(locks)):
                        conn.execute("SELECT pg_advisory_xact_lock(%s)", [lock_id(key)])
                    yield self
                finally:
                    self._local.conn = None
        except (StoreUnavailable, Conflict):
            raise
        except Exception as exc:
            mapped = _mapped(exc)
            if mapped is exc:
                raise
            raise mapped from exc

    def set_busy_timeout(self, seconds: float) -> None:
        """Lock waits are bounded per connection by the pool's lock_timeout (set when the pool was made)."""

    def version(self) -> int:
        rows = self.execute("SELECT coalesce(max(version), 0) FROM schema_version").rows \
            if self._has_table("schema_version") else [(0,)]
        return int(rows[0][0])

    def migrate(self) -> int:
        """Create what is missing, under an advisory lock, so replicas starting together do it once."""
        with self.transaction(SCHEMA_LOCK):
            self.execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT PRIMARY KEY, applied DOUBLE PRECISION)")
            current = int(self.execute("SELECT coalesce(max(version), 0) FROM schema_version").rows[0][0])
            for version, step in enumerate(MIGRATIONS[current:], start=current + 1):
                step(self)
                self.execute("INSERT INTO schema_version (version, applied) VALUES (?, extract(epoch from now()))",
                             [version])
        return len(MIGRATIONS)

    def _has_table(self, name: str) -> bool:
        return bool(self.execute("SELECT to_regclass(?) IS NOT NULL", [name]).rows[0][0])

    def close(self) -> None:
        """The pool is the process's, shared with every other component: nothing to close per handle."""


def ddl(name: str, table: Table) -> list[str]:
    """CREATE TABLE / INDEX statements for one declared table."""
    columns = []
    for column, kind in table.columns.items():
        default = table.defaults.get(column)
        columns.append(f'"{column}" {TYPES[kind]}' + (f" NOT NULL DEFAULT {default!r}" if default is not None else ""))
    columns.append("PRIMARY KEY (" + ", ".join(f'"{c}"' for c in table.key) + ")")
    for column, other, other_column in table.references:
        columns.append(f'FOREIGN KEY ("{column}") REFERENCES "{other}" ("{other_column}")')
    statements = [f'CREATE TABLE IF NOT EXISTS "{name}" ({", ".join(columns)})']
    for index in table.indexes:
        statements.append(f'CREATE INDEX IF NOT EXISTS "idx_{name}_{"_".join(index)}" ON "{name}" '
                          f'({", ".join(f"{c}" if c != "window" else chr(34) + c + chr(34) for c in index)})')
    return statements


def _v1_baseline(db: PostgresDatabase) -> None:
    """Version 1 on PostgreSQL: every table as `store.schema` declares it (the later steps then find
    their changes made already)."""
    for name, table in TABLES.items():
        for statement in ddl(name, table):
            db.execute(statement)


def _v2_key_roles_and_admin_actions(db: PostgresDatabase) -> None:
    """SQLite's version 7: api_keys.role/models/caps and admin_actions (no-ops on a database created after)."""
    for column in ("role", "models", "caps"):
        db.execute(f'ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS "{column}" TEXT')
    for statement in ddl("admin_actions", TABLES["admin_actions"]):
        db.execute(statement)


def _v3_training_batches(db: PostgresDatabase) -> None:
    """SQLite's version 8: training_batches."""
    for statement in ddl("training_batches", TABLES["training_batches"]):
        db.execute(statement)


def _v4_request_waves(db: PostgresDatabase) -> None:
    """SQLite's version 9: requests.waves."""
    db.execute('ALTER TABLE requests ADD COLUMN IF NOT EXISTS "waves" BIGINT')


def _v5_policy_stop(db: PostgresDatabase) -> None:
    """SQLite's version 10: policies.stop."""
    db.execute('ALTER TABLE policies ADD COLUMN IF NOT EXISTS "stop" TEXT')


MIGRATIONS = [_v1_baseline, _v2_key_roles_and_admin_actions, _v3_training_batches, _v4_request_waves,
              _v5_policy_stop]


def _mapped(exc: Exception) -> Exception:
    import psycopg
    from psycopg_pool import PoolTimeout

    if isinstance(exc, psycopg.IntegrityError):
        return Conflict(str(exc).splitlines()[0])
    if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError, psycopg.InternalError, PoolTimeout,
                        OSError)):
        return StoreUnavailable(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    if isinstance(exc, psycopg.errors.DiskFull):
        return StoreUnavailable(str(exc))
    return exc
