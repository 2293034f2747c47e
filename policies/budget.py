"""Budget arithmetic for one request: how large an N the tier's caps allow."""
from __future__ import annotations

import math


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
