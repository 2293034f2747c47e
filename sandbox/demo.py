"""Configs for replay-backed routes: the `iapo demo` setup and the test/bench fixtures share them."""
from __future__ import annotations

from policies.environments import BoNEnvironment, MVEnvironment
from sandbox.replay import prompt_text

DEMO_KEYS = {"low": "iapo-demo-low", "mid": "iapo-demo-mid", "high": "iapo-demo-high"}


def replay_upstream(base_url: str, model: str, *, supports_n: bool = True, **extra) -> dict:
    """An upstream entry for a replay model, priced so one completion costs its recorded cost."""
    return {"model": f"openai/{model}", "api_base": f"{base_url}/v1", "timeout": 30, "retries": 1,
            "max_concurrency": 256, "supports_n": supports_n,
            "price": {"prompt_per_1k": 0.0, "completion_per_1k": 0.01}, **extra}


def replay_route(model: str, upstream: str, env: MVEnvironment | BoNEnvironment, *, base_url: str,
                 env_name: str, start: dict | None = None, n_max: int | None = None) -> dict:
    """A route whose prompts map one-to-one onto the replay environment's prompts."""
    route = {
        "model": model, "upstream": upstream, "n_max": n_max or env.n_max,
        "prompts": [{"id": f"p{i}", "system": prompt_text(i), "params": {"temperature": 0.8, "max_tokens": 1200}}
                    for i in range(env.n_prompts)],
        "start": start or {"default": {"prompt": "p0", "n": 1}},
    }
    if isinstance(env, MVEnvironment):
        route.update(aggregator="mv", verifier={"url": f"{base_url}/gold/{env_name}"})
    else:
        route.update(aggregator="bon", objectives=[
            {"name": name, "scorer": {"type": "http", "url": f"{base_url}/score/{env_name}", "field": name}}
            for name in env.objectives])
    return route


def demo_tiers() -> list[dict]:
    """Three budget tiers: λ = 0, 0.2, 1.0 (as the paper's contexts), with caps on N and cost."""
    return [
        {"name": "low", "weights": {"correct": 1.0, "helpful": 0.5, "harmless": 0.5}, "cost_weight": 0.0, "max_n": 32},
        {"name": "mid", "weights": {"correct": 1.0, "helpful": 0.7, "harmless": 0.3}, "cost_weight": 0.2, "max_n": 16},
        {"name": "high", "weights": {"correct": 1.0, "helpful": 0.3, "harmless": 0.7}, "cost_weight": 1.0, "max_n": 8,
         "max_cost_per_request": 0.08},
    ]


def demo_config(base_url: str, db_path: str, mv: MVEnvironment, bon: BoNEnvironment) -> dict:
    from gateway.config import hash_key

    return {
        "upstreams": {
            "replay-mv": replay_upstream(base_url, "replay-mv"),
            "replay-bon": replay_upstream(base_url, "replay-bon"),
        },
        "routes": [
            replay_route("math", "replay-mv", mv, base_url=base_url, env_name="replay-mv",
                         start={"default": {"prompt": "p0", "n": 5}}),
            replay_route("assist", "replay-bon", bon, base_url=base_url, env_name="replay-bon",
                         start={"default": {"prompt": "p0", "n": 4}}),
        ],
        "tiers": demo_tiers(),
        "default_tier": "mid",
        "api_keys": [{"hash": hash_key(key), "tier": tier, "name": f"demo-{tier}"} for tier, key in DEMO_KEYS.items()],
        "store": {"path": db_path},
    }
