"""SQLite persistence: schema, the batched log writer, policy versions, feedback."""
from store.database import open_database
from store.policy_store import PolicyStore
from store.writer import LogWriter

__all__ = ["open_database", "PolicyStore", "LogWriter"]
