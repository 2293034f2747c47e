"""Opening the store: a SQLite file (the embedded default) or a PostgreSQL database (`postgresql://...`),
each brought to the newest schema. Both backends offer the same few operations (`Database`); the SQL
the store writes is the same for both (`?` placeholders, quoted identifiers, INSERT ... ON CONFLICT),
and what differs lives in `store.sqlite_backend` and `store.postgres_backend`."""
from __future__ import annotations

import contextlib
from typing import Iterator, Protocol

from store.result import Result
from store.sqlite_backend import LATEST_VERSION, SQLiteDatabase, schema_version  # noqa: F401  (re-exported)


class Database(Protocol):
    dialect: str  # "sqlite" | "postgres"
    url: str

    def execute(self, sql: str, params=()) -> Result: ...

    def executemany(self, sql: str, rows) -> None: ...

    def query(self, sql: str, params=()) -> list[dict]: ...

    def insert(self, table: str, rows: list[dict], *, upsert: tuple[str, ...] | None = None) -> None: ...

    def transaction(self, *locks: str): ...

    def set_busy_timeout(self, seconds: float) -> None: ...

    def version(self) -> int: ...

    def migrate(self) -> int: ...

    def close(self) -> None: ...


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def open_database(url: str, *, create: bool = True, busy_timeout: float = 30.0) -> Database:
    """The store at `url` (a file path, or a PostgreSQL URL), migrated to the newest schema."""
    if is_postgres(url):
        from store.postgres_backend import PostgresDatabase

        db = PostgresDatabase(url, busy_timeout=busy_timeout)
    else:
        db = SQLiteDatabase(url, busy_timeout=busy_timeout)
    if create:
        db.migrate()
    return db


def set_busy_timeout(db: Database, seconds: float) -> None:
    db.set_busy_timeout(seconds)


@contextlib.contextmanager
def write_transaction(db: Database, *locks: str) -> Iterator[Database]:
    """A write transaction; `locks` name what it must be serialised with on other connections."""
    with db.transaction(*locks):
        yield db
