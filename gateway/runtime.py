"""Everything built from one configuration, for serving and training alike; a reload builds a new
Runtime and swaps one reference."""
from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass
from typing import Callable

import httpx
import numpy as np

from gateway.config import Route, Settings, Tier
from gateway.scorers import RouteScorer
from gateway.upstream import UpstreamClient
from gateway.worst_case import Bound, bound
from policies.aggregate import AnswerExtractor
from policies.arms import Arm
from policies.budget import Cap


def prompt_version(route: Route, prompt_id: str) -> str:
    """Content hash of a prompt (texts and decoding settings): served pulls are reusable only on a match."""
    prompt = route.prompt(prompt_id)
    return hashlib.sha256(json.dumps(prompt.model_dump(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Runtime:
    settings: Settings
    upstreams: dict[str, UpstreamClient]
    scorers: dict[str, RouteScorer]
    extractors: dict[str, AnswerExtractor]
    key_to_tier: dict[str, str]
    key_models: dict[str, list[str] | None]
    prompt_versions: dict[tuple[str, str], str]
    users: int = 0  # requests in flight on this runtime: a replaced one is closed only when this is 0

    @classmethod
    def build(cls, settings: Settings, http: httpx.AsyncClient,
              on_upstream_error: Callable[[str, str], None] | None = None,
              reuse: dict[str, UpstreamClient] | None = None) -> "Runtime":
        """Everything from `settings`; upstream clients whose config did not change are taken from `reuse`
        (a reload keeps their connections and their concurrency slots, shared with requests in flight)."""
        reuse = reuse or {}
        upstreams = {name: reuse[name] if name in reuse and reuse[name].config == cfg
                     else UpstreamClient(name, cfg, on_error=on_upstream_error)
                     for name, cfg in settings.upstreams.items()}
        for name, cfg in settings.upstreams.items():
            if cfg.fallback:
                upstreams[name].fallback = upstreams[cfg.fallback]
        return cls(
            settings=settings,
            upstreams=upstreams,
            scorers={r.model: RouteScorer(r, upstreams, http) for r in settings.routes if r.aggregator == "bon"},
            extractors={r.model: AnswerExtractor(r.extractor.pattern, r.extractor.normalize) for r in settings.routes},
            key_to_tier={k.hash: k.tier for k in settings.api_keys},
            key_models={k.hash: k.models for k in settings.api_keys},
            prompt_versions={(r.model, p.id): prompt_version(r, p.id) for r in settings.routes for p in r.prompts},
        )

    async def aclose(self, keep=()) -> None:
        """Close the upstream clients (except those in `keep`, which a newer runtime still uses)."""
        for upstream in self.upstreams.values():
            if upstream not in keep:
                await upstream.aclose()

    def prepare(self) -> None:
        """Build every transport now (importing litellm takes seconds: never on a request)."""
        for upstream in self.upstreams.values():
            upstream.transport
            if upstream.config.price is None:
                import litellm  # noqa: F401  (its local cost table prices upstreams without `price`)

    def weights(self, route: Route, tier: Tier) -> np.ndarray:
        """The tier's weights over a route's objectives (BoN: equal when the tier names none; MV: `correct`)."""
        if route.aggregator == "mv":
            return np.array([tier.weights.get("correct", 1.0)])
        names = [o.name for o in route.objectives]
        if not tier.weights:
            return np.full(len(names), 1.0 / len(names))
        return np.array([tier.weights.get(name, 0.0) for name in names])

    def start_arm(self, route: Route, tier: str) -> Arm:
        """The configured arm a tier is served before any policy is published (or when it names a lost prompt)."""
        start = route.start.get(tier) or route.start.get("default")
        return Arm(start.prompt, start.n) if start else Arm(route.prompts[0].id, 1)

    def route_worst_case(self, route: Route, body: dict) -> tuple[float, float, int, Bound]:
        """One completion of a routed request at most: (its dollars with scoring, without scoring, its tokens,
        the bound). Serving clamps N and reserves by it; training's feasible arms use the same."""
        b = bound("chat", body, self.settings.limits.default_max_tokens)
        dollars, tokens = self.upstreams[route.upstream].worst_case(b)
        scoring = self.scorers[route.model].worst_case(body, tokens) if route.model in self.scorers else 0.0
        return dollars + scoring, dollars, tokens, b

    def gold(self, route: str | None, gold) -> str:
        """A gold answer in the form votes are compared in (the route's extractor normalises it)."""
        extract = self.extractors.get(route) if route else None
        return (extract(f"Final answer: {gold}") if extract else None) or str(gold).strip()

    def caps(self, tier: Tier, key_id: str | None, key_caps: dict | None = None) -> list[Cap]:
        """The spend caps a request of this tier (and key) must fit under; a key created with caps of its
        own has those instead of its tier's `key_caps`."""
        caps = [Cap(f"tier:{tier.name}", window, limit.dollars, limit.tokens) for window, limit in tier.caps.items()]
        if key_id is not None:
            if key_caps is not None:
                caps += [Cap(f"key:{key_id}", window, limit.get("dollars"), limit.get("tokens"))
                         for window, limit in key_caps.items()]
            else:
                caps += [Cap(f"key:{key_id}", window, limit.dollars, limit.tokens)
                         for window, limit in tier.key_caps.items()]
        return caps

    def models(self) -> list[tuple[str, str]]:
        """Every model a caller can name: (id, 'route' | 'upstream')."""
        return [(r.model, "route") for r in self.settings.routes] + [(u, "upstream") for u in self.settings.upstreams]

    def allows(self, tier: Tier, key_models: list[str] | None, model: str) -> bool:
        """Whether a caller of `tier` (with a key narrowed to `key_models`) may name `model`."""
        if not any(fnmatch.fnmatchcase(model, pattern) for pattern in tier.models):
            return False
        return key_models is None or any(fnmatch.fnmatchcase(model, pattern) for pattern in key_models)
