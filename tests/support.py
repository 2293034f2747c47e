"""Small helpers shared by the end-to-end tests: /metrics snapshots and polling."""
from __future__ import annotations

import time
from typing import Callable, TypeVar

import httpx
from prometheus_client.parser import text_string_to_metric_families

T = TypeVar("T")


def metrics_snapshot(url: str) -> dict:
    """{(sample name, frozenset(labels)): value} from a live /metrics, parsed with prometheus-client."""
    text = httpx.get(f"{url}/metrics").text
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def metric_value(snapshot: dict, metric: str, /, **labels) -> float:
    """Sum of the samples named `metric` whose labels include `labels`."""
    return sum(v for (n, ls), v in snapshot.items() if n == metric and set(labels.items()) <= ls)


def wait_for(probe: Callable[[], T], timeout: float = 10.0, interval: float = 0.05) -> T:
    """Poll until `probe()` returns something truthy; fail with AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
