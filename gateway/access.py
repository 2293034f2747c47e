"""Who is calling: API key → tier (config keys, then keys in the store), never keeping the key itself."""
from __future__ import annotations

import time
from dataclasses import dataclass

from gateway.config import Tier
from gateway.errors import unauthorized
from gateway.runtime import Runtime
from store.keys import KeyStore, hash_key

CACHE_SECONDS = 1.0  # a revoked key stops working within this long


@dataclass(frozen=True)
class Caller:
    tier: Tier
    key_id: str | None = None  # 16 hex digits of the key's hash, for per-key caps; never the key


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

    def _store_tier(self, digest: str, now: float):
        hit = self._cache.get(digest)
        if hit is None or now >= hit[1]:
            if len(self._cache) > 10_000:
                self._cache.clear()
            hit = (self.keys.tier_of(digest), now + CACHE_SECONDS)
            self._cache[digest] = hit
        return hit[0]

    def resolve(self, authorization: str | None, rt: Runtime) -> Caller:
        """A known key → its tier; no key → the default tier; unknown or revoked → 401."""
        key = None
        if authorization:
            scheme, _, value = authorization.partition(" ")
            key = value.strip() if scheme.lower() == "bearer" else authorization.strip()
        settings = rt.settings
        now = time.monotonic()
        if key and (rt.key_to_tier or self._store_has_keys(now)):
            digest = hash_key(key)
            tier = rt.key_to_tier.get(digest)
            if tier is None:
                tier = self._store_tier(digest, now)
                if tier is False:
                    raise unauthorized("This API key has been revoked.")
            if tier is None or tier not in {t.name for t in settings.tiers}:
                raise unauthorized()
            return Caller(settings.tier(tier), digest[7:23])
        return Caller(settings.tier(settings.default_tier_name))
