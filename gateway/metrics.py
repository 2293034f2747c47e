"""Prometheus metrics of the gateway (own registry; bounded labels: no ids, keys or caller strings)."""
from __future__ import annotations

import os

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, Summary, disable_created_metrics,
                               generate_latest)
from prometheus_client import multiprocess

disable_created_metrics()

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
QUALITY_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class GatewayMetrics:
    """Every series the gateway exports; one instance per app."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        # status: what the client got (499: it left before the end of a stream); "-": not resolved that far
        self.requests = Counter("iapo_requests", "Requests by route (or upstream:<name>), tier, arm and status",
                                ["route", "tier", "prompt", "n", "status", "endpoint"], registry=r)
        self.completions = Counter("iapo_completions", "Upstream completions drawn", ["route", "tier", "kind"], registry=r)
        self.tokens = Counter("iapo_tokens", "Tokens by kind", ["route", "tier", "kind"], registry=r)
        self.cost = Counter("iapo_cost_dollars", "Upstream cost in dollars", ["route", "tier", "kind"], registry=r)
        self.quality = Histogram("iapo_quality", "Chosen completion's quality per objective (MV: vote share)",
                                 ["route", "tier", "objective"], buckets=QUALITY_BUCKETS, registry=r)
        self.accuracy = Counter("iapo_feedback_correct", "MV answers judged by gold feedback", ["route", "tier", "correct"], registry=r)
        # a Summary: utilities can be negative, and a histogram with negative buckets exports no _sum
        self.utility = Summary("iapo_utility", "Utility of served requests (quality - cost weight x cost)",
                               ["route", "tier"], registry=r)
        self.latency = Histogram("iapo_request_duration_seconds", "End-to-end request latency", ["route", "tier"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_latency = Histogram("iapo_upstream_duration_seconds", "Upstream call latency", ["upstream"],
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("iapo_in_flight_requests", "Requests being served", registry=r,
                               multiprocess_mode="livesum")
        self.upstream_errors = Counter("iapo_upstream_errors", "Upstream call failures", ["upstream", "kind"], registry=r)
        self.waves = Histogram("iapo_request_waves", "Waves an adaptive (sequential) request drew", ["route", "tier"],
                               buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.completions_saved = Counter("iapo_completions_saved", "Completions an adaptive request did not draw "
                                         "because its vote was settled", ["route", "tier"], registry=r)
        self.failed_completions = Counter("iapo_failed_completions", "Completions lost to upstream failures", ["route", "tier"], registry=r)
        self.policy_version = Gauge("iapo_policy_version", "Serving policy version", registry=r, multiprocess_mode="max")
        self.log_queue = Gauge("iapo_log_queue_depth", "Log records waiting for the writer", registry=r,
                               multiprocess_mode="livesum")
        self.budget_rejections = Counter("iapo_budget_rejections", "Requests refused by a spend cap (429)",
                                         ["tier", "cap"], registry=r)
        self.budget_degradations = Counter("iapo_budget_degradations", "Requests served with fewer completions to fit a cap",
                                           ["route", "tier"], registry=r)
        self.store_up = Gauge("iapo_store_up", "1 while the request log is being written, 0 while writes fail",
                              registry=r, multiprocess_mode="livemin")
        self.store_up.set(1)
        self.log_oldest = Gauge("iapo_log_oldest_queued_seconds", "Age of the oldest log record not yet written",
                                registry=r, multiprocess_mode="livemax")
        self.deferred_settles = Gauge("iapo_deferred_settles", "Settles waiting for the ledger to accept writes",
                                      registry=r, multiprocess_mode="livesum")
        self.reservations_released = Counter("iapo_reservations_released", "Expired reservations released",
                                             registry=r)
        self.config_reloads = Counter("iapo_config_reloads", "Config reload attempts", ["result"], registry=r)
        self.config_ok = Gauge("iapo_config_last_reload_ok", "1 if the last config reload was accepted", registry=r,
                               multiprocess_mode="min")
        self.config_ok.set(1)

    def attach_ledger(self, ledger, settings) -> None:
        """Spend and remaining budget gauges, read from the shared SQLite ledger at scrape time."""
        self._spend = _SpendCollector(ledger, settings)
        self.registry.register(self._spend)

    def render(self) -> bytes:
        """Prometheus text. With several workers (PROMETHEUS_MULTIPROC_DIR set) every scrape merges all
        workers' files, so counters are the same whichever worker answers."""
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        if getattr(self, "_spend", None) is not None:
            merged.register(self._spend)
        return generate_latest(merged)

    @staticmethod
    def worker_exited() -> None:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            multiprocess.mark_process_dead(os.getpid())


class _SpendCollector:
    """Same values from every worker process: the ledger is the source, not process memory."""

    def __init__(self, ledger, settings) -> None:
        self.ledger, self.settings = ledger, settings

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        spend = GaugeMetricFamily("iapo_spend_dollars", "Dollars spent in the current window",
                                  labels=["scope", "name", "window"])
        tokens = GaugeMetricFamily("iapo_spend_tokens", "Tokens spent in the current window",
                                   labels=["scope", "name", "window"])
        remaining = GaugeMetricFamily("iapo_budget_remaining_dollars", "Dollars left under a tier cap",
                                      labels=["tier", "window"])
        ratio = GaugeMetricFamily("iapo_budget_used_ratio", "Share of a tier cap used (dollars or tokens, the larger)",
                                  labels=["tier", "window"])
        current = {(r["scope"], r["window"]): r for r in self.ledger.current()}
        for (scope, window), row in current.items():
            kind, _, name = scope.partition(":")
            if kind in ("tier", "explore"):  # per-key rows stay out of metrics: unbounded label values
                spend.add_metric([kind, name, window], row["dollars"])
                tokens.add_metric([kind, name, window], row["tokens"])
        for tier in self.settings().tiers:
            for window, limit in tier.caps.items():
                row = current.get((f"tier:{tier.name}", window), {"dollars": 0.0, "tokens": 0})
                used = []
                if limit.dollars is not None:
                    remaining.add_metric([tier.name, window], max(0.0, limit.dollars - row["dollars"]))
                    used.append(row["dollars"] / limit.dollars)
                if limit.tokens is not None:
                    used.append(row["tokens"] / limit.tokens)
                ratio.add_metric([tier.name, window], max(used))
        yield from (spend, tokens, remaining, ratio)
