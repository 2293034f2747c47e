"""Budget arithmetic for one request: how large an N the tier's caps allow."""
from __future__ import annotations

import math
from dataclasses import dataclass


def clamp_n(n: int, *, route_n_max: int, tier_max_n: int | None, max_cost_per_request: float | None,
            worst_cost_per_completion: float) -> int:
    """Largest N ≤ the arm's that respects `n_max`, the tier's `max_n` and its per-request cost cap.

    Never below 1: a request that cannot afford one completion is still served once (the cap is a
    ceiling on scaling, not a refusal; spend caps that refuse belong to the tier's budget windows).
    """
    n = min(n, route_n_max)
    if tier_max_n is not None:
        n = min(n, tier_max_n)
    if max_cost_per_request is not None and worst_cost_per_completion > 0:
        n = min(n, math.floor(max_cost_per_request / worst_cost_per_completion + 1e-9))
    return max(1, n)


# -- spend caps over calendar windows (UTC) ----------------------------------------------------
WINDOWS = ("per_minute", "per_day", "per_month")


def window_bounds(window: str, now: float) -> tuple[float, float]:
    """(start, reset) of the calendar window containing `now` (UTC): minute, day or month."""
    import datetime as dt

    t = dt.datetime.fromtimestamp(now, tz=dt.timezone.utc)
    if window == "per_minute":
        start = t.replace(second=0, microsecond=0)
        reset = start + dt.timedelta(minutes=1)
    elif window == "per_day":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        reset = start + dt.timedelta(days=1)
    elif window == "per_month":
        start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        reset = (start + dt.timedelta(days=32)).replace(day=1)
    else:
        raise ValueError(f"unknown window {window!r}; expected one of {WINDOWS}")
    return start.timestamp(), reset.timestamp()


@dataclass(frozen=True)
class Cap:
    """A spend limit: `scope` (e.g. 'tier:free' or 'key:<hash prefix>') over one window."""

    scope: str
    window: str
    dollars: float | None = None
    tokens: int | None = None


def affordable_n(n: int, *, per_completion_dollars: float, per_completion_tokens: int,
                 room: list[tuple[float | None, float | None]]) -> int:
    """Largest N' ≤ n whose worst case fits every cap's remaining (dollars, tokens) room; may be 0."""
    best = n
    for dollars_left, tokens_left in room:
        if dollars_left is not None:
            best = min(best, math.floor(dollars_left / per_completion_dollars + 1e-12) if per_completion_dollars > 0 else best)
        if tokens_left is not None:
            best = min(best, math.floor(tokens_left / per_completion_tokens) if per_completion_tokens > 0 else best)
    return max(0, best)
