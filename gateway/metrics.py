"""Prometheus metrics of the gateway (own registry; bounded labels: no ids, keys or caller strings)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
QUALITY_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class GatewayMetrics:
    """Every series the gateway exports; one instance per app."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("iapo_requests", "Chat requests served", ["route", "tier", "prompt", "n", "status"], registry=r)
        self.completions = Counter("iapo_completions", "Upstream completions drawn", ["route", "tier", "kind"], registry=r)
        self.tokens = Counter("iapo_tokens", "Tokens by kind", ["route", "tier", "kind"], registry=r)
        self.cost = Counter("iapo_cost_dollars", "Upstream cost in dollars", ["route", "tier", "kind"], registry=r)
        self.quality = Histogram("iapo_quality", "Chosen completion's quality per objective (MV: vote share)",
                                 ["route", "tier", "objective"], buckets=QUALITY_BUCKETS, registry=r)
        self.accuracy = Counter("iapo_feedback_correct", "MV answers judged by gold feedback", ["route", "tier", "correct"], registry=r)
        self.utility = Histogram("iapo_utility", "Utility of served requests (quality − λ·cost)", ["route", "tier"],
                                 buckets=(-1, -0.5, -0.2, 0, 0.2, 0.4, 0.6, 0.8, 1.0), registry=r)
        self.latency = Histogram("iapo_request_duration_seconds", "End-to-end request latency", ["route", "tier"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_latency = Histogram("iapo_upstream_duration_seconds", "Upstream call latency", ["upstream"],
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("iapo_in_flight_requests", "Requests being served", registry=r)
        self.upstream_errors = Counter("iapo_upstream_errors", "Upstream call failures", ["upstream", "kind"], registry=r)
        self.failed_completions = Counter("iapo_failed_completions", "Completions lost to upstream failures", ["route", "tier"], registry=r)
        self.policy_version = Gauge("iapo_policy_version", "Serving policy version", registry=r)
        self.log_queue = Gauge("iapo_log_queue_depth", "Log records waiting for the writer", registry=r)
