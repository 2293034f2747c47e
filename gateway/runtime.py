"""Everything derived from one configuration; a reload builds a new Runtime and swaps one reference."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import httpx
import numpy as np

from gateway.config import Route, Settings, Tier
from gateway.metrics import GatewayMetrics
from gateway.scorers import RouteScorer
from gateway.upstream import UPSTREAM_ERROR_KINDS, UpstreamClient
from policies.aggregate import AnswerExtractor
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
    prompt_versions: dict[tuple[str, str], str]

    @classmethod
    def build(cls, settings: Settings, http: httpx.AsyncClient, metrics: GatewayMetrics) -> "Runtime":
        upstreams = {name: UpstreamClient(name, cfg) for name, cfg in settings.upstreams.items()}
        for name, cfg in settings.upstreams.items():
            upstreams[name].on_error = lambda up, kind: metrics.upstream_errors.labels(up, kind).inc()
            for kind in UPSTREAM_ERROR_KINDS:  # export zeros, so rates and alerts exist before the first error
                metrics.upstream_errors.labels(name, kind)
            if cfg.fallback:
                upstreams[name].fallback = upstreams[cfg.fallback]
        return cls(
            settings=settings,
            upstreams=upstreams,
            scorers={r.model: RouteScorer(r, upstreams, http) for r in settings.routes if r.aggregator == "bon"},
            extractors={r.model: AnswerExtractor(r.extractor.pattern, r.extractor.normalize) for r in settings.routes},
            key_to_tier={k.hash: k.tier for k in settings.api_keys},
            prompt_versions={(r.model, p.id): prompt_version(r, p.id) for r in settings.routes for p in r.prompts},
        )

    async def aclose(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.aclose()

    def weights(self, route: Route, tier: Tier) -> np.ndarray:
        """The tier's weights over a BoN route's objectives (equal when the tier names none)."""
        names = [o.name for o in route.objectives]
        if not tier.weights:
            return np.full(len(names), 1.0 / len(names))
        return np.array([tier.weights.get(name, 0.0) for name in names])

    def caps(self, tier: Tier, key_id: str | None) -> list[Cap]:
        """The spend caps a request of this tier (and key) must fit under."""
        caps = [Cap(f"tier:{tier.name}", window, limit.dollars, limit.tokens) for window, limit in tier.caps.items()]
        if key_id is not None:
            caps += [Cap(f"key:{key_id}", window, limit.dollars, limit.tokens) for window, limit in tier.key_caps.items()]
        return caps
