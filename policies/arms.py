"""Arms, contexts (budget tiers) and serving policies as plain frozen values."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, order=True)
class Arm:
    """One way to serve a request: a prompt (template + decoding settings) drawn `n` times, or, with a
    stopping rule (`settled`, `lead<d>`: policies/stopping.py), up to `n` times in waves."""

    prompt_id: str
    n: int
    stop: str | None = None


@dataclass(frozen=True)
class Context:
    """A caller's context: weights over quality objectives and its price of inference λ."""

    weights: tuple[float, ...] = (1.0,)
    cost_weight: float = 0.0


@dataclass(frozen=True)
class RankedArm:
    """One candidate arm of a context as the engine ranks it: estimated value (utility, after the
    context's λ · cost) and its standard error, and the estimated mean cost of one request with it
    (n × the prompt's mean per-completion cost; NaN when unknown)."""

    prompt_id: str
    n: int
    value: float
    value_se: float
    cost: float

    @property
    def arm(self) -> Arm:
        return Arm(self.prompt_id, self.n)


@dataclass(frozen=True)
class Policy:
    """A versioned map (route, tier) -> Arm, with each pair's ranked alternatives (best first);
    `version` 0 means the configured starting arms."""

    version: int = 0
    arms: dict[tuple[str, str], Arm] = field(default_factory=dict)
    ranked: dict[tuple[str, str], tuple[RankedArm, ...]] = field(default_factory=dict)

    def arm_for(self, route: str, tier: str) -> Arm | None:
        return self.arms.get((route, tier))

    def alternatives(self, route: str, tier: str) -> tuple[RankedArm, ...]:
        return self.ranked.get((route, tier), ())
