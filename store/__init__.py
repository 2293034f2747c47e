"""Persistence on SQLite (embedded default) or PostgreSQL: versioned schema, the batched log writer, the
spend ledger, keys, policy versions, training runs and locks, feedback."""
from store.database import open_database, schema_version
from store.errors import BudgetExhausted, StoreError, StoreUnavailable
from store.policy_store import PolicyStore
from store.writer import LogWriter

__all__ = ["open_database", "schema_version", "PolicyStore", "LogWriter", "StoreError", "StoreUnavailable",
           "BudgetExhausted"]
