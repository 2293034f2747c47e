"""Copying a store's history into another (a SQLite file into PostgreSQL, when a deployment grows past
one host): every table in key order, in batches, as upserts, so a copy can be re-run to catch up."""
from __future__ import annotations

from store.database import Database
from store.schema import TABLES

SKIPPED = ("training_locks", "reservations")  # leases and in-flight holds belong to running processes
BATCH = 2_000


def copy_store(source: Database, target: Database, *, batch: int = BATCH) -> dict[str, int]:
    """Rows copied per table (requests before completions: the foreign key holds at every commit)."""
    counts = {}
    for name, table in TABLES.items():
        if name in SKIPPED:
            continue
        columns = ", ".join(f'"{c}"' for c in table.columns)
        order = ", ".join(f'"{c}"' for c in table.key)
        counts[name], offset = 0, 0
        while True:
            rows = source.query(f'SELECT {columns} FROM "{name}" ORDER BY {order} LIMIT ? OFFSET ?', [batch, offset])
            if not rows:
                break
            with target.transaction():
                target.insert(name, rows, upsert=table.key)
            counts[name] += len(rows)
            offset += len(rows)
    return counts
