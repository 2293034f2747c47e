"""Who is calling and what they may name: API key → tier and models (config keys, then keys in the
store), never keeping the key itself."""
from __future__ import annotations

import time
from dataclasses import dataclass

from gateway.config import Tier
from gateway.errors import GatewayError, model_not_found, unauthorized
from gateway.runtime import Runtime
from store.keys import KeyRecord, KeyStore, hash_key, key_id

CACHE_SECONDS = 0.5  # a key lookup is reused this long: a revoked key stops working on every replica within
# this plus one lookup (well inside the 1 s that README and issue 15 promise)


@dataclass(frozen=True)
class Caller:
    tier: Tier
    key_id: str | None = None  # 16 hex digits of the key's hash, for per-key caps; never the key
    key_models: tuple[str, ...] | None = None  # a key's narrower list of models, if it has one
    key_caps: dict | None = None  # a key's own caps ({window: {dollars, tokens}}), instead of its tier's key_caps

    @property
    def anonymous(self) -> bool:
        return self.key_id is None


@dataclass(frozen=True)
class Admin:
    """An operator holding an admin key: its name signs every action it takes."""

    name: str
    key_id: str


@dataclass(frozen=True)
class Target:
    """What a caller named: a route (served by its policy) or an upstream (forwarded)."""

    name: str
    kind: str  # "route" | "upstream"


class Access:
    def __init__(self, keys: KeyStore) -> None:
        self.keys = keys
        self._cache: dict[str, tuple[object, float]] = {}
        self._any: tuple[bool, float] = (False, 0.0)

    def clear(self) -> None:
        """Forget cached answers (after a reload), so changed key tiers apply at once."""
        self._cache.clear()

    def _store_has_keys(self, now: float) -> bool:
        if now >= self._any[1]:
            self._any = (self.keys.any(), now + CACHE_SECONDS)
        return self._any[0]

    def _stored(self, digest: str, now: float) -> KeyRecord | None:
        hit = self._cache.get(digest)
        if hit is None or now >= hit[1]:
            if len(self._cache) > 10_000:
                self._cache.clear()
            hit = (self.keys.lookup(digest), now + CACHE_SECONDS)
            self._cache[digest] = hit
        return hit[0]

    def resolve(self, authorization: str | None, rt: Runtime) -> Caller:
        """A known key → its tier; unknown or revoked → 401. No key (or, when the gateway has no keys at
        all, a bearer that is therefore not a credential) → anonymous on the default tier, or 401 with
        `access.require_key`."""
        key = _bearer(authorization)
        settings = rt.settings
        now = time.monotonic()
        if key and (rt.key_to_tier or self._store_has_keys(now)):
            digest = hash_key(key)
            tier, models, caps = rt.key_to_tier.get(digest), rt.key_models.get(digest), None
            if tier is None:
                record = self._stored(digest, now)
                if record is not None and record.role == "caller":
                    if record.revoked is not None:
                        raise unauthorized("This API key has been revoked.")
                    tier, models, caps = record.tier, record.models, record.caps
            if tier is None or tier not in {t.name for t in settings.tiers}:
                raise unauthorized()
            return Caller(settings.tier(tier), key_id(digest), tuple(models) if models is not None else None, caps)
        if settings.access.require_key:
            raise unauthorized("You didn't provide a valid API key: this gateway requires one "
                               "(Authorization: Bearer <key>).", code="missing_api_key")
        return Caller(settings.tier(settings.default_tier_name))

    def admin(self, authorization: str | None, rt: Runtime) -> Admin:
        """The operator behind an admin key (config `admin_keys`, or created with `iapo keys create
        --admin`); 401 without one, 403 for a caller's key."""
        key = _bearer(authorization)
        if not key:
            raise unauthorized("The console needs an admin key (Authorization: Bearer <admin key>).",
                               code="missing_api_key")
        digest = hash_key(key)
        configured = next((k for k in rt.settings.admin_keys if k.hash == digest), None)
        if configured is not None:
            return Admin(configured.name, key_id(digest))
        record = self._stored(digest, time.monotonic())
        if record is not None and record.role == "admin":
            if record.revoked is not None:
                raise unauthorized("This admin key has been revoked.")
            return Admin(record.name, record.id)
        if digest in rt.key_to_tier or record is not None:
            raise GatewayError(403, "This is a caller's key; the console needs an admin key.",
                               type="permission_error", code="admin_key_required")
        raise unauthorized()

    @staticmethod
    def authorise(caller: Caller, model: str, rt: Runtime) -> Target:
        """The route or upstream `model` names, if this caller may use it; else 404 (as OpenAI does for
        models a key cannot see, so their existence is not disclosed)."""
        kind = "route" if rt.settings.route(model) is not None else "upstream" if model in rt.upstreams else None
        if kind is None or not rt.allows(caller.tier, caller.key_models, model):
            raise model_not_found(model)
        return Target(model, kind)

    @staticmethod
    def visible_models(caller: Caller, rt: Runtime) -> list[tuple[str, str]]:
        return [(m, kind) for m, kind in rt.models() if rt.allows(caller.tier, caller.key_models, m)]


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return (value.strip() if scheme.lower() == "bearer" else authorization.strip()) or None
