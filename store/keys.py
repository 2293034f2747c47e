"""API keys kept in the store, hashed: caller keys (a tier, optionally their own models and caps) and
admin keys (the operator's console); create, list, revoke, look up. The secret is returned once."""
from __future__ import annotations

import hashlib
import json
import secrets
import time
import uuid
from dataclasses import dataclass

from store.database import Database, write_transaction
from store.errors import Conflict

ROLES = ("caller", "admin")


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def key_id(key_hash: str) -> str:
    """The 16 hex digits that name a key in caps, logs and the console (never the key itself)."""
    return key_hash[7:23]


@dataclass(frozen=True)
class KeyRecord:
    hash: str
    tier: str | None
    name: str
    role: str
    created: float
    revoked: float | None
    models: tuple[str, ...] | None = None
    caps: dict | None = None  # {window: {"dollars": ..., "tokens": ...}}: this key's own caps

    @property
    def id(self) -> str:
        return key_id(self.hash)

    def public(self) -> dict:
        """What may be shown of a key: never its secret (nor its full hash)."""
        return {"id": self.id, "name": self.name, "role": self.role, "tier": self.tier, "created": self.created,
                "revoked": self.revoked, "models": list(self.models) if self.models is not None else None,
                "caps": self.caps}


class KeyStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, tier: str | None, name: str = "", *, role: str = "caller", models: list[str] | None = None,
               caps: dict | None = None) -> tuple[str, KeyRecord]:
        """A new key; returns (the secret, shown this once; its record). Only the hash is stored. A name
        must be unique among active keys (Conflict otherwise): keys are revoked by name."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}")
        secret = ("iapo-admin-" if role == "admin" else "iapo-") + secrets.token_urlsafe(24)
        record = KeyRecord(hash_key(secret), tier if role == "caller" else None, name or f"key-{uuid.uuid4().hex[:6]}",
                           role, time.time(), None, tuple(models) if models is not None else None, caps)
        with write_transaction(self.db, "keys"):
            taken = self.db.execute("select 1 from api_keys where name = ? and revoked is null", [record.name]).fetchone()
            if taken:
                raise Conflict(f"an active key is already named {record.name!r}")
            self.db.insert("api_keys", [{"hash": record.hash, "tier": record.tier, "name": record.name,
                                         "role": role, "created": record.created, "revoked": None,
                                         "models": json.dumps(models) if models is not None else None,
                                         "caps": json.dumps(caps) if caps is not None else None}])
        return secret, record

    def list(self, *, role: str | None = None) -> list[KeyRecord]:
        where, params = ("where coalesce(role, 'caller') = ?", [role]) if role else ("", [])
        return [_record(r) for r in self.db.query(f"select * from api_keys {where} order by created", params)]

    def revoke(self, name_or_id: str) -> int:
        """Revoke by name, by id (16 hex digits) or by a hash prefix (≥ 8 hex digits); returns how many."""
        prefix = name_or_id if name_or_id.startswith("sha256:") else "sha256:" + name_or_id
        with write_transaction(self.db, "keys"):
            cursor = self.db.execute(
                "update api_keys set revoked = ? where revoked is null and (name = ? or (length(?) >= 15 and hash like ?))",
                [time.time(), name_or_id, prefix, prefix + "%"])
            return cursor.rowcount

    def lookup(self, key_hash: str) -> KeyRecord | None:
        rows = self.db.query("select * from api_keys where hash = ?", [key_hash])
        return _record(rows[0]) if rows else None

    def tier_of(self, key_hash: str) -> str | None | bool:
        """The tier of a live caller key; False when revoked; None when unknown (or an admin key)."""
        record = self.lookup(key_hash)
        if record is None or record.role != "caller":
            return None
        return False if record.revoked is not None else record.tier

    def any(self) -> bool:
        return self.db.execute("select 1 from api_keys where coalesce(role, 'caller') = 'caller' limit 1"
                               ).fetchone() is not None


def _record(row: dict) -> KeyRecord:
    models = json.loads(row["models"]) if row.get("models") else None
    return KeyRecord(row["hash"], row["tier"], row["name"] or "", row.get("role") or "caller", row["created"],
                     row["revoked"], tuple(models) if models is not None else None,
                     json.loads(row["caps"]) if row.get("caps") else None)
