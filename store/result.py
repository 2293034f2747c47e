"""What both backends share: a statement's fetched result, and the INSERT ... ON CONFLICT they both speak."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Result:
    """A statement's rows (fetched before its connection goes back to a pool), row count and columns."""

    rows: list[tuple]
    rowcount: int
    columns: list[str]

    def __iter__(self):
        return iter(self.rows)

    def fetchone(self) -> tuple | None:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[tuple]:
        return self.rows

    def dicts(self) -> list[dict]:
        return [dict(zip(self.columns, row)) for row in self.rows]


def insert_sql(table: str, rows: list[dict], upsert: tuple[str, ...] | None) -> tuple[str, list[tuple]]:
    """`INSERT INTO t (...) VALUES (?, ...)`, with `ON CONFLICT (key) DO UPDATE SET` every other column when
    `upsert` names the key: the same text for SQLite and PostgreSQL (identifiers quoted: `window` is a
    keyword in PostgreSQL)."""
    columns = list(rows[0])
    names = ", ".join(f'"{c}"' for c in columns)
    sql = f'INSERT INTO "{table}" ({names}) VALUES ({", ".join("?" for _ in columns)})'
    if upsert:
        updates = ", ".join(f'"{c}" = excluded."{c}"' for c in columns if c not in upsert)
        keys = ", ".join(f'"{c}"' for c in upsert)
        sql += f" ON CONFLICT ({keys}) DO " + (f"UPDATE SET {updates}" if updates else "NOTHING")
    return sql, [tuple(row.get(c) for c in columns) for row in rows]


class SharedOperations:
    """What both backends build on their own `execute` and `executemany`."""

    def query(self, sql: str, params=()) -> list[dict]:
        return self.execute(sql, params).dicts()

    def insert(self, table: str, rows: list[dict], *, upsert: tuple[str, ...] | None = None) -> None:
        """Insert rows (all with the same keys); with `upsert`, a row whose key exists replaces its columns."""
        if rows:
            sql, values = insert_sql(table, rows, upsert)
            self.executemany(sql, values)
