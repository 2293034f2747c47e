"""Gateway configuration: one YAML file plus IAPO_* environment overrides (pydantic-settings)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from policies.stopping import DEFAULT_TOLERANCE, StoppingRule, Waves
from store.keys import hash_key  # noqa: F401  (re-exported: `iapo keys hash` and tests use it from here)


class ConfigError(Exception):
    """A configuration that cannot be served; the message names the field and the problem."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Price(Strict):
    prompt_per_1k: float = Field(0.0, ge=0)
    completion_per_1k: float = Field(0.0, ge=0)


DIRECT_PROVIDERS = ("openai", "custom_openai", "hosted_vllm")  # litellm provider prefixes that speak OpenAI's API


class Upstream(Strict):
    """An upstream model: a direct OpenAI-compatible endpoint, or any provider litellm knows."""

    model: str
    api_base: str | None = None
    api_key_env: str | None = None  # secrets only from the environment
    timeout: float = Field(60.0, gt=0)
    retries: int = Field(1, ge=0)
    max_concurrency: int = Field(64, ge=1)
    supports_n: bool = True
    # openai: bodies and streams forwarded as they are to an OpenAI-compatible api_base (no translation, no
    # litellm on the request path). litellm: any provider litellm knows (translation, auth). auto (default):
    # openai for `openai/...` (and vLLM) models, litellm for every other provider.
    transport: Literal["auto", "litellm", "openai"] = "auto"
    price: Price | None = None
    batch_discount: float = Field(0.5, gt=0, le=1)  # what batch jobs cost relative to `price` (OpenAI: half)
    fallback: str | None = None

    @property
    def provider(self) -> str | None:
        """The litellm provider prefix of `model` (`openai/gpt-4o` -> `openai`), None without one."""
        prefix, sep, _ = self.model.partition("/")
        return prefix if sep else None

    @property
    def direct(self) -> bool:
        """True when calls go straight to an OpenAI-compatible endpoint (transport openai, or auto)."""
        if self.transport != "auto":
            return self.transport == "openai"
        return self.provider in DIRECT_PROVIDERS or (self.provider is None and self.api_base is not None)

    @property
    def wire_model(self) -> str:
        """The model name the provider expects in the body (provider prefix stripped for direct calls)."""
        return self.model.split("/", 1)[-1] if self.direct and self.provider in DIRECT_PROVIDERS else self.model

    @model_validator(mode="after")
    def _direct_transport_needs_base(self) -> "Upstream":
        if self.transport == "openai" and not self.api_base and self.provider not in (None, "openai"):
            raise ValueError("transport 'openai' needs an api_base")
        return self

    def base_url(self) -> str:
        return (self.api_base or "https://api.openai.com/v1").rstrip("/")

    def api_key(self) -> str | None:
        if self.api_key_env:
            return os.environ.get(self.api_key_env)
        return os.environ.get("OPENAI_API_KEY") if self.direct and not self.api_base else None


DECODING_PARAMS = ("temperature", "top_p", "max_tokens", "max_completion_tokens", "presence_penalty",
                   "frequency_penalty", "stop", "seed", "reasoning_effort")


class Prompt(Strict):
    """A candidate prompt: system text and/or an instruction appended to the last user message."""

    id: str
    system: str | None = None
    instruction: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_params(self) -> "Prompt":
        unknown = set(self.params) - set(DECODING_PARAMS)
        if unknown:
            raise ValueError(f"unknown decoding parameter(s) {sorted(unknown)}; allowed: {list(DECODING_PARAMS)}")
        return self


class Extractor(Strict):
    pattern: str | None = None
    normalize: bool = True


class Scorer(Strict):
    """How one objective is scored: http (reward model), judge (LLM via litellm), regex, json, length."""

    type: Literal["http", "judge", "regex", "json", "length"]
    url: str | None = None
    field: str | None = None
    upstream: str | None = None
    rubric: str | None = None
    pattern: str | None = None
    target_chars: int | None = None
    timeout: float = 10.0


class Objective(Strict):
    name: str
    scorer: Scorer
    low: float = 0.0  # raw scores are mapped from [low, high] to [0, 1]
    high: float = 1.0


class StartArm(Strict):
    prompt: str
    n: int = Field(1, ge=1)


class Verifier(Strict):
    """Gold answers for MV training when feedback has none: POST {messages} → {"gold": ...}."""

    type: Literal["http"] = "http"
    url: str
    timeout: float = 10.0


class Route(Strict):
    model: str
    upstream: str
    aggregator: Literal["bon", "mv"]
    prompts: list[Prompt] = Field(min_length=1)
    n_max: int = Field(32, ge=1, le=128)
    extractor: Extractor = Field(default_factory=Extractor)
    objectives: list[Objective] = Field(default_factory=list)
    start: dict[str, StartArm] = Field(default_factory=dict)
    verifier: Verifier | None = None
    # decoding settings where a caller's value replaces the arm's (README: "Caller fields on a route");
    # by default the arm's settings win, except that a smaller max_tokens from the caller is honoured
    caller_overrides: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> "Route":
        ids = [p.id for p in self.prompts]
        if len(set(ids)) != len(ids):
            raise ValueError(f"prompt ids must be unique, got {ids}")
        if self.aggregator == "bon" and not self.objectives:
            raise ValueError("a bon route needs at least one objective with a scorer")
        for tier, arm in self.start.items():
            if arm.prompt not in ids:
                raise ValueError(f"start.{tier}.prompt {arm.prompt!r} is not one of the route's prompts {ids}")
        unknown = set(self.caller_overrides) - set(DECODING_PARAMS)
        if unknown:
            raise ValueError(f"caller_overrides {sorted(unknown)} are not decoding parameters {list(DECODING_PARAMS)}")
        return self

    def prompt(self, prompt_id: str) -> Prompt:
        return next(p for p in self.prompts if p.id == prompt_id)


class CapLimit(Strict):
    """A spend limit over one calendar window (UTC): dollars and/or tokens."""

    dollars: float | None = Field(None, gt=0)
    tokens: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _something(self) -> "CapLimit":
        if self.dollars is None and self.tokens is None:
            raise ValueError("a cap needs dollars and/or tokens")
        return self


Window = Literal["per_minute", "per_day", "per_month"]


class Adaptive(Strict):
    """Majority-vote routes draw the arm's N in waves and stop once the vote is settled
    (policies/stopping.py): `settled` stops when the leader cannot be caught by the draws left, so the
    answer is the one all N would give; `likely` stops when the chance that the draws left would change
    the answer is below `risk`; `lead` stops when the leader is `lead` votes ahead (cheaper, and may
    cost accuracy); `learned`: `iapo train` chooses the rule and N_max per tier, or a fixed arm, by the
    tier's utility, taking the fewest completions among arms within `tolerance` of the best utility.
    `never` draws majority-vote routes at once (for a tier that wants waves on best-of-N only).
    Best-of-N routes draw in the same waves when `threshold` is set, scoring each wave as it arrives,
    and stop once a completion's weighted score (the tier's weights) reaches it; without it, all N."""

    rule: Literal["settled", "likely", "lead", "learned", "never"] = "settled"
    lead: int = Field(3, ge=1)
    risk: float = Field(0.001, gt=0, lt=1)
    tolerance: float = Field(DEFAULT_TOLERANCE, ge=0, le=0.1)
    threshold: float | None = Field(None, ge=0)  # best-of-N: stop once a weighted score reaches it
    first_wave: int = Field(2, ge=1)
    wave: int = Field(2, ge=1)
    max_waves: int | None = Field(None, ge=1)

    @property
    def waves(self) -> Waves:
        return Waves(self.first_wave, self.wave, self.max_waves)

    @property
    def stopping_rule(self) -> StoppingRule | None:
        """The configured rule; None for `learned` (the policy's arm carries it)."""
        if self.rule in ("learned", "never"):
            return None
        if self.rule == "likely":
            return StoppingRule("likely", risk=self.risk)
        return StoppingRule(self.rule, self.lead if self.rule == "lead" else 0)


class Tier(Strict):
    name: str
    weights: dict[str, float] = Field(default_factory=dict)
    cost_weight: float = Field(0.0, ge=0)
    max_n: int | None = Field(None, ge=1)
    max_cost_per_request: float | None = Field(None, gt=0)
    caps: dict[Window, CapLimit] = Field(default_factory=dict)  # for the whole tier
    key_caps: dict[Window, CapLimit] = Field(default_factory=dict)  # for each API key of the tier
    on_exhausted: Literal["reject", "degrade"] = "reject"
    adaptive: Adaptive | None = None  # draw in waves and stop early (majority vote; best-of-N with a threshold)
    # which models (routes and upstreams, fnmatch patterns) callers of this tier may name
    models: list[str] = Field(default_factory=lambda: ["*"])


class ApiKey(Strict):
    """A caller key, stored as `sha256:<hex>` of the key; never the key itself."""

    hash: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    tier: str
    name: str = ""
    models: list[str] | None = None  # narrows the tier's models for this key


class AdminKey(Strict):
    """A key for the operator's console (/admin, /ui), stored as `sha256:<hex>`; it cannot call models."""

    hash: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    name: str


class AccessConfig(Strict):
    """Who may call: `require_key` refuses anonymous callers (401); otherwise they get `default_tier`."""

    require_key: bool = False
    anonymous_feedback: bool = False  # may anonymous callers attach feedback to anonymous responses


class StoreConfig(Strict):
    # a SQLite file (the embedded default) or postgresql://user:pass@host/db (several replicas, one truth)
    url: str = "./iapo.db"
    path: str | None = None  # the older name of `url` (a SQLite file); kept equal to url
    queue_size: int = Field(10_000, ge=1)
    batch_size: int = Field(256, ge=1)
    policy_poll_seconds: float = Field(1.0, gt=0)
    # after_commit: a response leaves once its log rows are committed (a crash loses nothing answered);
    # queued: once they are queued (a crash loses what was still queued)
    ack: Literal["after_commit", "queued"] = "after_commit"
    ack_timeout: float = Field(5.0, gt=0)
    # while the store cannot write: refuse new requests with 503 before any upstream call, or buffer
    # up to queue_size requests in memory and refuse beyond that
    on_write_failure: Literal["refuse", "buffer"] = "refuse"
    reservation_grace_seconds: float = Field(30.0, ge=0)  # a reservation expires at its request's deadline + this

    @model_validator(mode="after")
    def _path_is_url(self) -> "StoreConfig":
        if self.path is not None and "url" not in self.model_fields_set:
            self.url = self.path
        self.path = self.url
        return self


class TrainConfig(Strict):
    """Offline re-learning of each route's policy from logged traffic (`iapo train`)."""

    budget: int = Field(5000, ge=1)  # completions per run
    max_dollars: float | None = Field(None, gt=0)
    window_hours: float = Field(24 * 7, gt=0)
    min_queries: int = Field(20, ge=1)
    max_queries: int = Field(1000, ge=1)
    concurrency: int = Field(32, ge=1)
    max_share: float = Field(0.5, gt=0, le=1)  # of each upstream's max_concurrency: serving keeps the rest
    interval_seconds: float | None = Field(None, gt=0)  # `iapo serve` trains itself this often; off by default
    screening_k: int | None = Field(None, ge=1)
    screening_fraction: float = Field(0.2, gt=0, lt=1)
    estimator: Literal["pooled", "subset", "block"] = "pooled"  # PSST's estimates (README: PSST as implemented)
    # completions per pull with the pooled estimator (default: 4 for shrunk vote curves, else 8)
    pull_size: int | None = Field(None, ge=1)
    reuse_served: bool = True
    seed: int = 0
    # send each exploration pull a `seed` derived from train.seed and its position in the run, so where a
    # provider honours seeds a run's draws are reproducible (two runs with one seed learn the same policy)
    pull_seeds: bool = False
    # live: each round's pulls are upstream calls; batch: each round is one provider batch job (OpenAI's
    # Batches API, at the upstream's batch_discount); `iapo train` waits up to batch_wait_seconds for it,
    # and a later call picks the run up where its batch stands
    mode: Literal["live", "batch"] = "live"
    batch_poll_seconds: float = Field(5.0, gt=0)
    batch_wait_seconds: float = Field(3600.0, ge=0)

    @model_validator(mode="after")
    def _pull_size_needs_pooled(self) -> "TrainConfig":
        if self.pull_size is not None and self.estimator != "pooled":
            raise ValueError("pull_size needs estimator 'pooled' (other estimators pull at the largest active N)")
        return self


class Limits(Strict):
    max_body_bytes: int = 1_000_000
    max_header_bytes: int = 32_768
    max_messages: int = 256
    max_tokens: int = 32_768
    # a request that sets no token limit, on a tier with caps or a cost cap, is sent with this one (so its
    # reservation is a real bound); the field added is named in x-iapo-limited
    default_max_tokens: int = Field(4096, ge=1)
    max_json_depth: int = Field(64, ge=4)
    stream_keepalive_seconds: float = Field(10.0, gt=0)  # SSE comments while N > 1 completions are drawn
    header_timeout: float = Field(10.0, gt=0)  # request line and headers must arrive within this
    idle_timeout: float = Field(5.0, gt=0)  # a connection with no request in flight is closed after this
    body_timeout: float = Field(30.0, gt=0)  # a body that stops arriving for this long gets 408
    max_connections: int | None = Field(None, ge=1)  # per process; default: from the open-file limit


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the YAML file named by IAPO_CONFIG (or passed to load_config)."""

    def __init__(self, settings_cls, path: str | None) -> None:
        super().__init__(settings_cls)
        self.path = path

    def get_field_value(self, field, field_name):  # pragma: no cover - whole-file source
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        if not self.path:
            return {}
        data = yaml.safe_load(Path(self.path).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{self.path}: the top level must be a mapping")
        return data


_config_path_override: str | None = None


class Settings(BaseSettings):
    """The whole configuration; see README for an annotated example."""

    model_config = SettingsConfigDict(env_prefix="IAPO_", env_nested_delimiter="__", extra="forbid")

    upstreams: dict[str, Upstream] = Field(default_factory=dict)
    routes: list[Route] = Field(default_factory=list)
    tiers: list[Tier] = Field(default_factory=lambda: [Tier(name="default")])
    default_tier: str | None = None
    api_keys: list[ApiKey] = Field(default_factory=list)
    admin_keys: list[AdminKey] = Field(default_factory=list)
    access: AccessConfig = Field(default_factory=AccessConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    limits: Limits = Field(default_factory=Limits)
    train: TrainConfig = Field(default_factory=TrainConfig)
    seed: int | None = None

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        path = _config_path_override or os.environ.get("IAPO_CONFIG")
        return (init_settings, env_settings, _YamlSource(settings_cls, path))

    @model_validator(mode="after")
    def _cross_references(self) -> "Settings":
        tiers = [t.name for t in self.tiers]
        if len(set(tiers)) != len(tiers):
            raise ValueError(f"tier names must be unique, got {tiers}")
        if self.default_tier is not None and self.default_tier not in tiers:
            raise ValueError(f"default_tier {self.default_tier!r} is not a tier {tiers}")
        for i, key in enumerate(self.api_keys):
            if key.tier not in tiers:
                raise ValueError(f"api_keys.{i}.tier {key.tier!r} is not a tier {tiers}")
        if {k.hash for k in self.api_keys} & {k.hash for k in self.admin_keys}:
            raise ValueError("a key cannot be both an api key and an admin key")
        names = [r.model for r in self.routes]
        if len(set(names)) != len(names):
            raise ValueError(f"route models must be unique, got {names}")
        for i, route in enumerate(self.routes):
            if route.upstream not in self.upstreams:
                raise ValueError(f"routes.{i}.upstream {route.upstream!r} is not an upstream {sorted(self.upstreams)}")
            if route.model in self.upstreams:
                raise ValueError(f"routes.{i}.model {route.model!r} is also an upstream name")
            for tier in route.start:
                if tier != "default" and tier not in tiers:
                    raise ValueError(f"routes.{i}.start.{tier} is not a tier {tiers}")
            objectives = {o.name for o in route.objectives}
            for t in self.tiers:
                extra = set(t.weights) - objectives - {"correct"}
                if route.aggregator == "bon" and extra:
                    raise ValueError(f"tier {t.name!r} weights {sorted(extra)} name no objective of route {route.model!r}")
        for name, up in self.upstreams.items():
            if up.fallback is not None and up.fallback not in self.upstreams:
                raise ValueError(f"upstreams.{name}.fallback {up.fallback!r} is not an upstream")
            chain, current = [name], up.fallback
            while current is not None:
                if current in chain:
                    raise ValueError(f"upstreams.{name}.fallback forms a cycle: {' -> '.join(chain + [current])}")
                chain.append(current)
                current = self.upstreams[current].fallback
        return self

    def tier(self, name: str) -> Tier:
        return next(t for t in self.tiers if t.name == name)

    def route(self, model: str) -> Route | None:
        return next((r for r in self.routes if r.model == model), None)

    @property
    def default_tier_name(self) -> str:
        return self.default_tier or self.tiers[0].name


def load_config(path: str | None = None, **overrides: Any) -> Settings:
    """Build Settings from `path` (or IAPO_CONFIG) and the environment; ConfigError names the field."""
    global _config_path_override
    _config_path_override = str(path) if path is not None else None
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read configuration: {exc}") from None
    finally:
        _config_path_override = None
