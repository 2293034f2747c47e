"""API keys kept in the store, hashed: create, list, revoke, look up."""
from __future__ import annotations

import secrets
import time

from store.database import Database, write_transaction


def hash_key(key: str) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, tier: str, name: str = "") -> str:
        """A new key for `tier`; the plain key is returned once and only its hash is stored."""
        key = "iapo-" + secrets.token_urlsafe(24)
        with write_transaction(self.db):
            self.db.insert("api_keys", [{"hash": hash_key(key), "tier": tier, "name": name, "created": time.time(),
                                         "revoked": None}])
        return key

    def list(self) -> list[dict]:
        return self.db.query("select hash, tier, name, created, revoked from api_keys order by created")

    def revoke(self, name_or_hash: str) -> int:
        """Revoke by name or by a hash prefix (≥ 8 hex digits); returns how many keys were revoked."""
        prefix = name_or_hash if name_or_hash.startswith("sha256:") else "sha256:" + name_or_hash
        with write_transaction(self.db):
            cursor = self.db.execute(
                "update api_keys set revoked = ? where revoked is null and (name = ? or (length(?) >= 15 and hash like ?))",
                [time.time(), name_or_hash, prefix, prefix + "%"])
            return cursor.rowcount

    def tier_of(self, key_hash: str) -> str | None | bool:
        """The tier of a live key; False when the key is revoked; None when unknown."""
        row = self.db.execute("select tier, revoked from api_keys where hash = ?", [key_hash]).fetchone()
        if row is None:
            return None
        return False if row[1] is not None else row[0]

    def any(self) -> bool:
        return self.db.execute("select 1 from api_keys limit 1").fetchone() is not None
