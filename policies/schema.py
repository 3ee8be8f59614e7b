"""The whole configuration file as pydantic v2 models; :class:`Settings` is the root.

Sections (every model forbids unknown keys)::

    server:          host, port, max_body_bytes, passthrough_direct_models, request_timeout_s
    auth:            api_keys (empty strings dropped; no keys = no auth)
    probe:           ProbeSettings (probes.probe) + timeout_s, the gateway's deadline for one probe,
                     + batching {enabled, max_batch, window_ms} (micro-batching)
                     + backend (local | vllm) and vllm {base_url, model, timeout_s}
    calibration:     path to a calibration JSON (relative to the config file's folder), and
                     answer_path: a cascade's answer calibration
    cache:           memory {max_entries, ttl_s}, redis {url, ttl_s, timeout_s, key_prefix} | null
    backends:        name -> openai | local | human            (discriminated on `type`)
    virtual_models:  model name -> {policy}                    (default: auto -> default)
    policies:        name -> {rules, default, on_probe_error, cascade}
    experiments:     A/B tests: [{name, model, key, arms: [{name, policy, weight}], control,
                     enabled}]
    events:          per-request records -> sink (sqlite | jsonl | redis | none)
    escalation:      the human-escalation queue (store, lease, expiry, webhook, reviewer keys)

A rule is ``{name, when: Condition, route: backend, fallback: [backends]}``; the conditions of a
``when`` are ANDed. ``share: s`` hands the rule the sparsest ``s`` of reference traffic,
cumulatively with the share rules before it in the same policy: rules with shares 0.02 then
0.28 match percentiles >= 0.98 and >= 0.70 (the threshold is ``1 - cumulative share``).

Cross-checks (unknown backends and policies, fallback cycles, shares adding up to more than 1,
percentile rules without a calibration, ...) raise :class:`SchemaProblems`, a ``ValueError``
that carries the location of every problem relative to the model that raised it, so that
:mod:`policies.loader` can point at the offending line of the YAML file.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from probes.probe import ProbeSettings

__all__ = [
    "Action",
    "AuthSettings",
    "Backend",
    "Band",
    "BatchingSettings",
    "CacheSettings",
    "CalibrationSettings",
    "Cascade",
    "Condition",
    "EscalationSettings",
    "EventsSettings",
    "Experiment",
    "ExperimentArm",
    "HumanBackend",
    "IntBand",
    "Loc",
    "LocalBackend",
    "MemoryCacheSettings",
    "MetricCondition",
    "OpenAIBackend",
    "PercentileBand",
    "Policy",
    "Price",
    "ProbeSection",
    "RedisCacheSettings",
    "Rule",
    "SchemaProblems",
    "ServerSettings",
    "Settings",
    "Timeouts",
    "VirtualModel",
    "VllmProbeSettings",
    "WebhookSettings",
    "format_loc",
]

Loc = tuple[str | int, ...]

#: Cumulative shares may exceed 1 by this much (float rounding of e.g. 0.1 + 0.2 + 0.7).
_SHARE_SLACK = 1e-9
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def format_loc(loc: Loc) -> str:
    """``("policies", "default", "rules", 2, "route")`` -> ``policies.default.rules[2].route``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


class SchemaProblems(ValueError):
    """Cross-check failures, each with its location relative to the model that raised it."""

    def __init__(self, problems: list[tuple[Loc, str]]):
        self.problems: tuple[tuple[Loc, str], ...] = tuple(problems)
        super().__init__(
            "\n".join(f"{format_loc(loc)}: {msg}" if loc else msg for loc, msg in self.problems)
        )


def _names(names: Any) -> str:
    return ", ".join(sorted(str(n) for n in names)) or "(none)"


def _as_tuple(value: Any) -> Any:
    """Let a single string stand for a one-element list."""
    return (value,) if isinstance(value, str) else value


def _key_list(value: Any) -> Any:
    """A list of keys: one string stands for a list of one; entries stripped, empty ones (an
    unset ``${VAR:-}``) dropped."""
    value = _as_tuple(value)
    if isinstance(value, list | tuple):
        return tuple(k.strip() if isinstance(k, str) else k for k in value if k != "")
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- server, auth, probe, calibration, cache ---------------------------------------------------


class ServerSettings(_Model):
    """The HTTP side of the gateway."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535, description="0 = any free port")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="larger request bodies get a 413")
    passthrough_direct_models: bool = Field(
        True,
        description="a request naming a model that a backend lists under `models` goes straight "
        "to that backend, without probe or policy",
    )
    request_timeout_s: float = Field(600.0, gt=0, description="whole-request deadline")


class ApiKey(_Model):
    """One scoped key. ``key`` is the key itself (or ``${ENV}``), or ``sha256:<64 hex>`` of it."""

    key: str = Field(min_length=1, repr=False)
    scope: Literal["client", "reviewer", "admin"] = "client"
    name: str | None = Field(None, description="shown in logs, metrics and rate limits")

    @field_validator("key")
    @classmethod
    def _hashed_form(cls, v: str) -> str:
        v = v.strip()
        if v.startswith("sha256:") and not re.fullmatch(r"sha256:[0-9a-fA-F]{64}", v):
            raise ValueError(
                "a hashed key is 'sha256:' followed by 64 hex digits "
                "(python -c \"import hashlib;print(hashlib.sha256(b'KEY').hexdigest())\")"
            )
        return v


class RateLimitSettings(_Model):
    """A token bucket per API key (per client address without keys): ``requests_per_s`` refill,
    ``burst`` capacity. In Redis when ``redis_url`` or ``cache.redis`` is set, else in memory."""

    requests_per_s: float = Field(gt=0)
    burst: int = Field(1, ge=1)
    redis_url: str | None = None
    per_key: dict[str, float] = Field(
        default_factory=dict, description="key name -> requests_per_s override"
    )


class AuthSettings(_Model):
    """API keys clients must send as ``Authorization: Bearer KEY``.

    Empty strings are dropped, so ``["${ROUTER_API_KEY:-}"]`` means "the key in
    ``$ROUTER_API_KEY``, or no authentication when it is unset or empty".
    """

    api_keys: tuple[str, ...] = Field((), repr=False)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _drop_empty(cls, v: Any) -> Any:
        return _key_list(v)

    @field_validator("api_keys")
    @classmethod
    def _no_blank(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(k for k in v if k)

    keys: tuple[ApiKey, ...] = Field(
        (), description="scoped keys: plain, ${ENV} or sha256:<hex>; api_keys are client keys"
    )
    rate_limit: RateLimitSettings | None = None

    @field_validator("keys", mode="before")
    @classmethod
    def _drop_empty_keys(cls, v: Any) -> Any:
        # ``key: "${ROUTER_ADMIN_KEY:-}"`` with the variable unset drops the entry.
        if isinstance(v, list | tuple):
            return tuple(k for k in v if not (isinstance(k, dict) and k.get("key") == ""))
        return v

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys) or bool(self.keys)


class BatchingSettings(_Model):
    """``probe.batching``: distinct requests arriving within ``window_ms`` (or until
    ``max_batch`` are waiting) share one forward pass."""

    enabled: bool = True
    max_batch: int = Field(16, ge=1, le=1024, description="requests per forward pass at most")
    window_ms: float = Field(5.0, ge=0, le=1000, description="how long a batch collects")


class VllmProbeSettings(_Model):
    """Where the remote probe (``probe.backend: vllm``) finds its vLLM pooling server.

    The server runs the folder ``python -m probes.derived --layer L`` prints, served under the
    name ``--name`` prints (the default for ``model``); see README "vLLM backends".
    """

    base_url: str = Field(description="the server's …/v1 URL")
    model: str | None = Field(None, description="served model name; None: the derived name")
    timeout_s: float = Field(5.0, gt=0, description="per HTTP request to the server")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"expected an http:// or https:// URL, got {v!r}")
        return v.rstrip("/")


class ProbeSection(ProbeSettings):
    """The ``probe:`` section: :class:`probes.probe.ProbeSettings` plus the gateway's deadline.

    ``timeout_s`` bounds one probe measurement as seen by the gateway (queueing in the
    micro-batcher included); past it the request goes to the policy's ``on_probe_error``.
    """

    timeout_s: float = Field(2.0, gt=0, description="gateway-side deadline for one probe")
    batching: BatchingSettings = BatchingSettings()
    warm_up: bool = Field(
        True, description="run one probe pass at start-up, before /readyz reports ready"
    )
    backend: Literal["local", "vllm"] = Field(
        "local", description="local: in-process forward pass; vllm: a vLLM pooling server"
    )
    vllm: VllmProbeSettings | None = None

    def probe_settings(self) -> ProbeSettings:
        """The plain :class:`ProbeSettings` (what ``SparsityProbe`` and calibrations compare)."""
        return ProbeSettings(
            **self.model_dump(exclude={"timeout_s", "batching", "warm_up", "backend", "vllm"})
        )

    @model_validator(mode="after")
    def _remote_probe_fits(self) -> ProbeSection:
        """A vLLM pooling server returns one vector per request: one layer, last token."""
        if self.backend != "vllm":
            return self
        problems: list[tuple[Loc, str]] = []
        if self.vllm is None:
            problems.append(
                (("vllm",), "backend: vllm needs a `vllm:` section with base_url (and model)")
            )
        layers = set(self.layers) | ({self.score_layer} if self.score_layer is not None else set())
        if len(layers) != 1:
            problems.append(
                (
                    ("layers",),
                    f"backend: vllm reads one layer per server, got layers {sorted(layers)}: "
                    "give a single layer (and no other score_layer)",
                )
            )
        elif 0 in layers:
            problems.append((("layers",), "backend: vllm cannot read layer 0 (the embeddings)"))
        if self.state_layers:
            problems.append(
                (
                    ("state_layers",),
                    "backend: vllm returns one rescaled vector, not the hidden vectors a "
                    "supervised model on the probe's states reads: use backend: local",
                )
            )
        if self.token_mean or self.score_position == "mean":
            where = "token_mean" if self.token_mean else "score_position"
            problems.append(
                ((where,), "backend: vllm reads the last token only: remove token-mean settings")
            )
        if problems:
            raise SchemaProblems(problems)
        return self


class CalibrationSettings(_Model):
    """Where the calibration (raw score -> percentile) lives.

    A relative ``path`` is resolved against the folder of the config file
    (:meth:`Settings.calibration_path`). Without a calibration, results carry no percentile and
    rules using ``percentile`` or ``share`` are rejected.
    """

    path: str | None = None
    answer_path: str | None = Field(
        None,
        description="a supervised calibration fitted on prompts plus the small model's answers "
        "(calibrate --labels --answer-column): what a policy's cascade reads",
    )

    @field_validator("path", "answer_path")
    @classmethod
    def _not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            return None
        return v


class MemoryCacheSettings(_Model):
    max_entries: int = Field(10_000, ge=0, description="0 disables the memory cache")
    ttl_s: float = Field(3600.0, gt=0)


class RedisCacheSettings(_Model):
    url: str = Field(description="redis://host:port/db (rediss:// for TLS)")
    ttl_s: float = Field(86_400.0, gt=0)
    timeout_s: float = Field(0.05, gt=0, description="per call; a slow Redis is a cache miss")
    key_prefix: str = "sparsity-router:"

    @field_validator("url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        if urlsplit(v).scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got {v!r}")
        return v


class CacheSettings(_Model):
    """Probe results are cached by the probed text: memory first, then Redis when configured."""

    memory: MemoryCacheSettings = MemoryCacheSettings()
    redis: RedisCacheSettings | None = None


# -- backends ----------------------------------------------------------------------------------


class Timeouts(_Model):
    connect_s: float = Field(5.0, gt=0)
    read_s: float = Field(60.0, gt=0, description="longest gap between two chunks")
    total_s: float = Field(600.0, gt=0, description="whole upstream request")


class Price(_Model):
    """What a backend costs, per million tokens (any currency; the report just adds it up)."""

    input_per_mtok: float = Field(0.0, ge=0)
    output_per_mtok: float = Field(0.0, ge=0)

    def cost(self, prompt_tokens: int | None, completion_tokens: int | None) -> float | None:
        """The cost of one request, or None when its token counts are unknown."""
        if prompt_tokens is None or completion_tokens is None:
            return None
        return (
            prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok
        ) / 1e6


class OpenAIBackend(_Model):
    """An OpenAI-compatible server (vLLM, TGI, llama.cpp, OpenAI itself) behind one or more URLs.

    Each ``base_urls`` entry may hold several URLs separated by commas or spaces, so that one
    environment variable can list replicas: ``["${LARGE_URLS}"]``.
    """

    type: Literal["openai"]
    base_urls: tuple[str, ...] = Field(min_length=1, description="…/v1 URLs; replicas")
    model: str | None = Field(None, description="rewrite the request's model to this name")
    api_key_env: str | None = Field(None, description="env var holding the upstream API key")
    timeouts: Timeouts = Timeouts()
    max_connections: int = Field(100, ge=1)
    fallback: tuple[str, ...] = ()
    models: tuple[str, ...] = Field((), description="model names served by direct pass-through")
    price: Price | None = Field(None, description="per million tokens, for event costs")

    @field_validator("base_urls", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        v = _as_tuple(v)
        if isinstance(v, list | tuple) and all(isinstance(x, str) for x in v):
            return tuple(u for x in v for u in re.split(r"[\s,]+", x) if u)
        return v

    @field_validator("base_urls")
    @classmethod
    def _http_urls(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for url in v:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
        return tuple(u.rstrip("/") for u in v)

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not _ENV_NAME.match(v):
            raise ValueError(
                f"expected the NAME of an environment variable (like LARGE_API_KEY), got {v!r}"
            )
        return v

    @field_validator("fallback", "models", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return _as_tuple(v)


class LocalBackend(_Model):
    """A model run in-process by the gateway (the embedded default's small model)."""

    type: Literal["local"]
    model: str | None = Field(
        None, description="hub id, path or bundled:NAME; None: the probe's model"
    )
    max_new_tokens: int = Field(256, ge=1)
    share_probe_model: bool = Field(
        True, description="reuse the probe's loaded weights when the model is the probe's"
    )
    fallback: tuple[str, ...] = ()
    price: Price | None = Field(None, description="per million tokens, for event costs")

    @field_validator("fallback", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return _as_tuple(v)


class HumanBackend(_Model):
    """Escalation to a human reviewer (the ``escalation:`` section configures the queue).

    ``mode: ticket`` answers at once with ``ticket_message`` (``{id}`` is the escalation id) and
    the client polls ``GET /v1/escalations/{id}``; ``mode: hold`` keeps the request open up to
    ``wait_s`` and answers with the reviewer's reply, else ``on_timeout`` answers (a backend
    name, or ``ticket``). ``fallback``: backends that answer when the escalation queue itself
    is unavailable.
    """

    type: Literal["human"]
    mode: Literal["ticket", "hold"] = "ticket"
    wait_s: float = Field(120.0, gt=0, description="hold: how long the request stays open")
    keepalive_s: float = Field(
        5.0, gt=0, description="hold + stream: ': waiting' SSE comment interval"
    )
    on_timeout: str = Field("ticket", description="hold: backend answering past wait_s, or ticket")
    ticket_message: str = Field(
        "A person will answer this request. Your ticket is {id}: poll "
        "GET /v1/escalations/{id} with the same API key for the answer.",
        min_length=1,
    )
    fallback: tuple[str, ...] = ()

    @field_validator("fallback", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return _as_tuple(v)

    @field_validator("ticket_message")
    @classmethod
    def _placeholder(cls, v: str) -> str:
        try:
            v.format(id="x")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"ticket_message may only use the placeholder {{id}} (write {{{{ and }}}} for "
                f"literal braces): {exc}"
            ) from None
        return v


Backend = Annotated[OpenAIBackend | LocalBackend | HumanBackend, Field(discriminator="type")]


# -- conditions, rules, policies ---------------------------------------------------------------


class Band(_Model):
    """A half-open interval ``[min, max)``; either end may be left open."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Band:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        for end in (self.min, self.max):
            if end is not None and math.isnan(end):
                raise ValueError("min and max must be numbers, not NaN")
        if self.min is not None and self.max is not None and not self.min < self.max:
            raise ValueError(f"min ({self.min:g}) must be less than max ({self.max:g})")
        return self

    def contains(self, value: float) -> bool:
        if math.isnan(value):
            return False
        return (self.min is None or value >= self.min) and (self.max is None or value < self.max)

    def describe(self) -> str:
        lo = "-inf" if self.min is None else f"{self.min:g}"
        hi = "inf" if self.max is None else f"{self.max:g}"
        return f"[{lo}, {hi})"


class PercentileBand(Band):
    """A percentile band in [0, 1]. ``max: 1`` includes 1 (no percentile lies above it)."""

    min: float | None = Field(None, ge=0, le=1)
    max: float | None = Field(None, ge=0, le=1)

    def contains(self, value: float) -> bool:
        if self.max is not None and self.max >= 1 and value >= 1:
            return self.min is None or value >= self.min
        return Band.contains(self, value)


class IntBand(_Model):
    """An integer interval ``[min, max)`` (token counts)."""

    min: int | None = Field(None, ge=0)
    max: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> IntBand:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and not self.min < self.max:
            raise ValueError(f"min ({self.min}) must be less than max ({self.max})")
        return self

    def contains(self, value: int) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value < self.max)

    def describe(self) -> str:
        hi = "inf" if self.max is None else str(self.max)
        return f"[{self.min or 0}, {hi})"


class MetricCondition(Band):
    """A raw metric value (as in ``ProbeResult.metrics``, not oriented) within ``[min, max)``.

    ``layer`` uses the probe's numbering (0 = embeddings; negative counts from the end and is
    resolved by the engine when it knows the probe's layer count). ``position: mean`` needs
    the probe's ``token_mean``.
    """

    layer: int
    name: str
    position: Literal["last", "mean"] = "last"


class Condition(_Model):
    """What a request must satisfy for a rule to apply; all given fields must hold (AND)."""

    always: bool | None = Field(None, description="true: matches every request")
    percentile: PercentileBand | None = None
    share: float | None = Field(None, gt=0, le=1)
    p_large: PercentileBand | None = Field(
        None, description="P(large model does better), from a calibration fitted with --labels"
    )
    score: Band | None = None
    metric: MetricCondition | None = None
    n_tokens: IntBand | None = None
    model: tuple[str, ...] | None = Field(None, description="requested model name(s)")
    user: tuple[str, ...] | None = Field(None, description="the request's `user` field")
    header: dict[str, tuple[str, ...]] | None = Field(
        None, description="header name (any case) -> accepted value(s)"
    )
    metadata: dict[str, tuple[str, ...]] | None = Field(
        None, description="request metadata key -> accepted value(s)"
    )

    @field_validator("model", "user", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return _as_tuple(v)

    @field_validator("header", "metadata", mode="before")
    @classmethod
    def _values(cls, v: Any) -> Any:
        if isinstance(v, Mapping):
            return {k: _as_tuple(x) for k, x in v.items()}
        return v

    @field_validator("header")
    @classmethod
    def _lower(cls, v: dict[str, tuple[str, ...]] | None) -> dict[str, tuple[str, ...]] | None:
        return None if v is None else {k.lower(): x for k, x in v.items()}

    @model_validator(mode="after")
    def _meaningful(self) -> Condition:
        given = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if not given:
            raise ValueError(
                "empty condition: give at least one of "
                f"{', '.join(type(self).model_fields)} (write `always: true` for a rule that "
                "matches every request)"
            )
        if self.always is False:
            raise ValueError("`always: false` never matches; remove the rule instead")
        if self.always and len(given) > 1:
            others = ", ".join(g for g in given if g != "always")
            raise ValueError(f"`always: true` cannot be combined with {others}")
        if self.share is not None and self.percentile is not None:
            raise ValueError("use either share or percentile in one condition, not both")
        for name in ("model", "user"):
            if getattr(self, name) == ():
                raise ValueError(f"{name}: give at least one value")
        return self

    @property
    def needs_probe(self) -> bool:
        """Whether evaluating this condition needs a probe result."""
        return any(
            x is not None
            for x in (
                self.percentile,
                self.share,
                self.p_large,
                self.score,
                self.metric,
                self.n_tokens,
            )
        )

    @property
    def needs_calibration(self) -> bool:
        return self.percentile is not None or self.share is not None or self.p_large is not None


class Action(_Model):
    """Where to send a request: a backend and, optionally, a fallback list overriding its own.

    In YAML a bare backend name stands for ``{route: NAME}``.
    """

    route: str
    fallback: tuple[str, ...] | None = None

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, v: Any) -> Any:
        return {"route": v} if isinstance(v, str) else v

    @field_validator("fallback", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return _as_tuple(v)


class Rule(_Model):
    """``when`` the condition holds, ``route`` to a backend (first matching rule wins)."""

    name: str | None = Field(None, description="default: rules[i]")
    when: Condition
    route: str
    fallback: tuple[str, ...] | None = Field(None, description="overrides the backend's fallback")

    @field_validator("fallback", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return _as_tuple(v)


class CascadeCondition(_Model):
    """When a cascade escalates: the checked answer's P(the large model does better)."""

    p_large: PercentileBand


class Cascade(_Model):
    """Check ``backend``'s answers before returning them.

    A request the policy sends to ``backend`` is answered by it first (non-streaming); the probe
    then reads the prompt plus that answer, and the answer calibration (``calibration.
    answer_path``) gives P(the large model does better). When P lies in ``when`` the request is
    sent to ``escalate_to`` (streamed if the client asked), otherwise the first answer is
    returned (as a stream if the client asked for one).
    """

    backend: str = Field(description="the backend whose answers are checked (the small model)")
    escalate_to: str = Field(description="the backend asked instead when the check fails")
    when: CascadeCondition = Field(description="escalate when the answer's P lies in this band")
    on_probe_error: Literal["keep", "escalate"] = Field(
        "keep", description="when the answer cannot be probed: return it, or escalate"
    )


class Policy(_Model):
    """Ordered rules, the action when none matches, and the backend used when the probe fails;
    optionally a cascade that checks one backend's answers."""

    rules: tuple[Rule, ...] = ()
    default: Action
    on_probe_error: str = Field(description="backend for requests whose probe failed")
    cascade: Cascade | None = None

    @field_validator("rules")
    @classmethod
    def _named(cls, v: tuple[Rule, ...]) -> tuple[Rule, ...]:
        return tuple(
            r if r.name is not None else r.model_copy(update={"name": f"rules[{i}]"})
            for i, r in enumerate(v)
        )

    @model_validator(mode="after")
    def _rules_consistent(self) -> Policy:
        problems: list[tuple[Loc, str]] = []
        seen: dict[str, int] = {}
        cumulative = 0.0
        shares: list[float] = []
        unconditional: int | None = None
        for i, rule in enumerate(self.rules):
            assert rule.name is not None
            if rule.name in seen:
                problems.append(
                    (
                        ("rules", i, "name"),
                        f"duplicate rule name {rule.name!r} (see rules[{seen[rule.name]}])",
                    )
                )
            seen.setdefault(rule.name, i)
            if unconditional is not None:
                problems.append(
                    (
                        ("rules", i),
                        f"this rule can never match: rules[{unconditional}] "
                        "(`always: true`) before it matches every request",
                    )
                )
            if rule.when.always:
                unconditional = i if unconditional is None else unconditional
            share = rule.when.share
            if share is not None:
                shares.append(share)
                cumulative = math.fsum(shares)
                if cumulative > 1 + _SHARE_SLACK:
                    terms = " + ".join(f"{s:g}" for s in shares)
                    problems.append(
                        (
                            ("rules", i, "when", "share"),
                            f"the shares of this policy's rules add up to {cumulative:g} "
                            f"({terms}); they must add up to at most 1",
                        )
                    )
        if problems:
            raise SchemaProblems(problems)
        return self

    def share_thresholds(self) -> dict[str, float]:
        """Rule name -> cumulative share (the sparsest traffic taken so far) for share rules."""
        out: dict[str, float] = {}
        shares: list[float] = []
        for rule in self.rules:
            if rule.when.share is not None:
                shares.append(rule.when.share)
                assert rule.name is not None
                out[rule.name] = min(1.0, math.fsum(shares))
        return out


class VirtualModel(_Model):
    """A model name clients may request (``auto``) that is routed by a policy."""

    policy: str


# -- experiments, escalation, events ----------------------------------------------------------


class ExperimentArm(_Model):
    """One arm of an experiment: the policy its requests are routed by, and its share."""

    name: str
    policy: str
    weight: float = Field(gt=0, le=1)


class Experiment(_Model):
    """An A/B test: requests for ``model`` are split between arms by a sticky hash of ``key``.

    ``key``: ``user`` (the request's ``user`` field), ``api_key`` (the client's bearer key) or
    ``header:<name>``. A request without the key goes to the ``control`` arm (default: the
    first arm), and so does every request while ``enabled`` is false (the kill switch).
    """

    name: str
    model: str = "auto"
    key: str = Field("user", description="user | api_key | header:<name>")
    arms: tuple[ExperimentArm, ...]
    control: str | None = Field(None, description="arm for keyless requests; default: first")
    enabled: bool = Field(True, description="false: the kill switch, everyone gets control")

    @field_validator("key")
    @classmethod
    def _key(cls, v: str) -> str:
        if v not in ("user", "api_key") and not (v.startswith("header:") and len(v) > 7):
            raise ValueError(f"expected user, api_key or header:<name>, got {v!r}")
        return v

    @model_validator(mode="after")
    def _weights(self) -> Experiment:
        problems: list[tuple[Loc, str]] = []
        if len(self.arms) < 2:
            problems.append((("arms",), "give at least two arms (a control and a treatment)"))
        seen: dict[str, int] = {}
        for i, arm in enumerate(self.arms):
            if arm.name in seen:
                problems.append(
                    (
                        ("arms", i, "name"),
                        f"duplicate arm name {arm.name!r} (see arms[{seen[arm.name]}])",
                    )
                )
            seen.setdefault(arm.name, i)
        total = math.fsum(a.weight for a in self.arms)
        if abs(total - 1) > 1e-6:
            terms = " + ".join(f"{a.weight:g}" for a in self.arms)
            problems.append(
                (("arms",), f"arm weights add up to {total:g} ({terms}); they must add up to 1")
            )
        if self.control is not None and self.control not in seen:
            problems.append((("control",), f"unknown arm {self.control!r}; arms: {_names(seen)}"))
        if problems:
            raise SchemaProblems(problems)
        return self

    @property
    def control_arm(self) -> ExperimentArm:
        """The arm keyless requests (and everyone, when ``enabled`` is false) go to."""
        for arm in self.arms:
            if arm.name == self.control:
                return arm
        return self.arms[0]


class WebhookSettings(_Model):
    """POSTed a JSON summary of every new escalation (never blocks the request)."""

    url: str
    timeout_s: float = Field(5.0, gt=0)
    retries: int = Field(3, ge=0, le=10, description="retries after the first try, with backoff")
    secret: str | None = Field(
        None,
        description="HMAC-SHA256 signing secret (use ${ENV}); the receiver checks "
        "x-router-signature = sha256=hex(HMAC(secret, timestamp + '.' + body))",
    )

    @field_validator("secret")
    @classmethod
    def _no_blank_secret(cls, v: str | None) -> str | None:
        return v or None  # "${WEBHOOK_SECRET:-}" unset: unsigned

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"expected an http:// or https:// URL, got {v!r}")
        return v


class EscalationSettings(_Model):
    """Human escalation: a durable queue of requests waiting for a reviewer's answer.

    ``store: sqlite`` (embedded, one gateway process or several on one host) keeps it in
    ``path`` (relative to the config file); ``store: redis`` shares it between gateway
    processes (``redis_url``, else ``cache.redis.url``). A reviewer's claim holds for
    ``lease_s``; an escalation nobody answered within ``expire_s`` expires. Reviewers use keys
    with scope ``reviewer`` or ``admin`` (``auth.keys``) or the plain ``reviewer_keys`` here.
    """

    store: Literal["sqlite", "redis"] = "sqlite"
    path: str = "escalations.sqlite"
    redis_url: str | None = None
    key_prefix: str = "sparsity-router:escalations:"
    lease_s: float = Field(300.0, gt=0, description="how long a reviewer's claim holds")
    expire_s: float = Field(86_400.0, gt=0, description="unanswered escalations expire after")
    retention_s: float | None = Field(
        30 * 86_400.0,
        gt=0,
        description="closed escalations (answered, rejected, expired) created longer ago are "
        "deleted; null keeps them forever",
    )
    webhook: WebhookSettings | None = None
    reviewer_keys: tuple[str, ...] = Field(
        (), repr=False, description="keys with scope reviewer (plain, ${ENV} or sha256:<hex>)"
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        if v is not None and urlsplit(v).scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got {v!r}")
        return v

    @field_validator("reviewer_keys", mode="before")
    @classmethod
    def _drop_empty(cls, v: Any) -> Any:
        return _key_list(v)


class EventsSettings(_Model):
    """One record per request (decision, score, latency, tokens, status, cost) written to a sink.

    ``sink``: ``sqlite`` (the file ``path``), ``jsonl`` (the file ``path``), ``redis`` (a stream
    ``stream`` at ``redis_url``, trimmed to about ``max_len`` entries) or ``none``. Records go
    through a bounded in-memory queue of ``queue_size`` to a writer thread; a full queue or a
    failing sink drops records (counted in ``router_events_dropped``), never a request.
    """

    sink: Literal["sqlite", "jsonl", "redis", "none"] = "sqlite"
    path: str = Field("events.sqlite", description="default for jsonl: events.jsonl")
    redis_url: str | None = None
    stream: str = "sparsity-router:events"
    max_len: int = Field(100_000, ge=1)
    queue_size: int = Field(10_000, ge=1)
    batch_size: int = Field(256, ge=1, description="records per write")
    usage: Literal["inject", "passive"] = Field(
        "inject",
        description="streams: inject: ask upstream for usage and strip the usage-only chunk "
        "the client did not ask for; passive: record tokens only when the client asked",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_path(cls, v: Any) -> Any:
        if isinstance(v, Mapping) and "path" not in v and v.get("sink") == "jsonl":
            return {**v, "path": "events.jsonl"}
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        if v is not None and urlsplit(v).scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got {v!r}")
        return v

    @model_validator(mode="after")
    def _redis_needs_url(self) -> EventsSettings:
        if self.sink == "redis" and not self.redis_url:
            raise SchemaProblems(
                [(("redis_url",), "sink 'redis' needs redis_url (e.g. redis://127.0.0.1:6379/0)")]
            )
        return self


# -- the root ----------------------------------------------------------------------------------


def _default_virtual_models() -> dict[str, VirtualModel]:
    return {"auto": VirtualModel(policy="default")}


class Settings(_Model):
    """The whole configuration file.

    Build it with :func:`policies.loader.load_settings` (YAML, env interpolation, line-numbered
    errors) or ``Settings.model_validate(data, context={"base_dir": folder})``.
    """

    server: ServerSettings = ServerSettings()
    auth: AuthSettings = AuthSettings()
    probe: ProbeSection = ProbeSection()
    calibration: CalibrationSettings = CalibrationSettings()
    cache: CacheSettings = CacheSettings()
    backends: dict[str, Backend] = Field(min_length=1)
    virtual_models: dict[str, VirtualModel] = Field(default_factory=_default_virtual_models)
    policies: dict[str, Policy] = Field(min_length=1)
    experiments: tuple[Experiment, ...] = ()
    escalation: EscalationSettings | None = None
    events: EventsSettings | None = None

    _base_dir: Path | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _cross_check(self, info: ValidationInfo) -> Settings:
        if info.context and info.context.get("base_dir") is not None:
            self._base_dir = Path(info.context["base_dir"])
        problems = [*self._check_backends(), *self._check_policies(), *self._check_models()]
        problems += self._check_experiments()
        if problems:
            raise SchemaProblems(problems)
        return self

    # -- cross-checks (each yields (loc, message) with loc from the root) -------------------

    def _unknown_backend(self, name: str) -> str:
        return f"unknown backend {name!r}; known: {_names(self.backends)}"

    def _check_backends(self) -> list[tuple[Loc, str]]:
        problems: list[tuple[Loc, str]] = []
        for name, backend in self.backends.items():
            if not _NAME.match(name):
                problems.append(
                    (
                        ("backends", name),
                        f"bad backend name {name!r}: use letters, digits, '_', '.' and '-'",
                    )
                )
            if isinstance(backend, HumanBackend):
                problems.extend(self._check_human(name, backend))
            for i, target in enumerate(backend.fallback):
                if target not in self.backends:
                    loc: Loc = ("backends", name, "fallback", i)
                    problems.append((loc, self._unknown_backend(target)))
        problems.extend(self._fallback_cycles())
        problems.extend(self._human_fallbacks())
        return problems

    def _check_human(self, name: str, backend: HumanBackend) -> list[tuple[Loc, str]]:
        problems: list[tuple[Loc, str]] = []
        target = backend.on_timeout
        if target != "ticket":
            if target not in self.backends:
                problems.append(
                    (
                        ("backends", name, "on_timeout"),
                        f"{self._unknown_backend(target)} (or 'ticket' to answer with a ticket)",
                    )
                )
            elif isinstance(self.backends[target], HumanBackend):
                problems.append(
                    (
                        ("backends", name, "on_timeout"),
                        f"on_timeout {target!r} is a human backend; name an openai or local "
                        "backend, or 'ticket'",
                    )
                )
        esc = self.escalation
        expire_s = (esc or EscalationSettings()).expire_s
        if backend.mode == "hold" and backend.wait_s >= expire_s:
            problems.append(
                (
                    ("backends", name, "wait_s"),
                    f"a hold of {backend.wait_s:g} s outlives escalation.expire_s "
                    f"({expire_s:g} s): the escalation would expire before on_timeout answers. "
                    "Fix: make wait_s shorter than expire_s",
                )
            )
        if esc is not None and esc.store == "redis" and esc.redis_url is None:
            if self.cache.redis is None:
                problems.append(
                    (
                        ("escalation", "redis_url"),
                        "store 'redis' needs escalation.redis_url (or cache.redis.url)",
                    )
                )
        return problems

    def _human_fallbacks(self) -> list[tuple[Loc, str]]:
        """A human backend answers only as a decision's own backend, never as a fallback."""
        problems: list[tuple[Loc, str]] = []
        humans = {n for n, b in self.backends.items() if isinstance(b, HumanBackend)}
        msg = (
            "{t!r} is a human backend and cannot be a fallback; route to it with a rule "
            "(route:) instead"
        )
        for name, backend in self.backends.items():
            for i, target in enumerate(backend.fallback):
                if target in humans:
                    problems.append((("backends", name, "fallback", i), msg.format(t=target)))
        for pname, policy in self.policies.items():
            for i, rule in enumerate(policy.rules):
                for j, target in enumerate(rule.fallback or ()):
                    if target in humans:
                        loc: Loc = ("policies", pname, "rules", i, "fallback", j)
                        problems.append((loc, msg.format(t=target)))
            for j, target in enumerate(policy.default.fallback or ()):
                if target in humans:
                    loc = ("policies", pname, "default", "fallback", j)
                    problems.append((loc, msg.format(t=target)))
        return problems

    def escalation_settings(self) -> EscalationSettings | None:
        """The escalation queue's settings when a human backend exists (defaults if unset)."""
        if not any(isinstance(b, HumanBackend) for b in self.backends.values()):
            return None
        return self.escalation or EscalationSettings()

    def _fallback_cycles(self) -> list[tuple[Loc, str]]:
        """Every cycle of the backends' fallback graph, reported once, at its first backend."""
        problems: list[tuple[Loc, str]] = []
        order = {name: i for i, name in enumerate(self.backends)}
        seen_cycles: set[tuple[str, ...]] = set()
        done: set[str] = set()

        def visit(node: str, stack: list[str]) -> None:
            if node in stack:
                cycle = stack[stack.index(node) :]
                start = min(range(len(cycle)), key=lambda k: order[cycle[k]])
                cycle = cycle[start:] + cycle[:start]
                key = tuple(cycle)
                if key not in seen_cycles:
                    seen_cycles.add(key)
                    head, nxt = cycle[0], cycle[1 % len(cycle)]
                    index = self.backends[head].fallback.index(nxt)
                    shown = " → ".join([*cycle, cycle[0]])
                    problems.append(
                        (("backends", head, "fallback", index), f"fallback cycle {shown}")
                    )
                return
            if node in done or node not in self.backends:
                return
            stack.append(node)
            for nxt in self.backends[node].fallback:
                visit(nxt, stack)
            stack.pop()
            done.add(node)

        for name in self.backends:
            visit(name, [])
        return problems

    def _check_action(
        self, loc: Loc, route: str, fallback: tuple[str, ...] | None
    ) -> list[tuple[Loc, str]]:
        problems: list[tuple[Loc, str]] = []
        if route not in self.backends:
            problems.append(((*loc, "route"), self._unknown_backend(route)))
        for i, target in enumerate(fallback or ()):
            if target not in self.backends:
                problems.append(((*loc, "fallback", i), self._unknown_backend(target)))
            elif target == route:
                problems.append(
                    (
                        (*loc, "fallback", i),
                        f"fallback cycle {route} → {route}: a backend cannot be its own fallback",
                    )
                )
        return problems

    def _check_policies(self) -> list[tuple[Loc, str]]:
        problems: list[tuple[Loc, str]] = []
        measured = set(self.probe.metrics)
        token_mean = self.probe.token_mean or self.probe.score_position == "mean"
        for pname, policy in self.policies.items():
            base: Loc = ("policies", pname)
            if not _NAME.match(pname):
                problems.append(
                    (base, f"bad policy name {pname!r}: use letters, digits, '_', '.' and '-'")
                )
            for i, rule in enumerate(policy.rules):
                loc: Loc = (*base, "rules", i)
                problems.extend(self._check_action(loc, rule.route, rule.fallback))
                when = rule.when
                for field in ("percentile", "share", "p_large"):
                    if getattr(when, field) is not None and self.calibration.path is None:
                        problems.append(
                            (
                                (*loc, "when", field),
                                f"{field} conditions need a calibration: set calibration.path "
                                "(or use score, which needs none)",
                            )
                        )
                metric = when.metric
                if metric is not None:
                    if metric.name not in measured:
                        problems.append(
                            (
                                (*loc, "when", "metric", "name"),
                                f"metric {metric.name!r} is not measured by the probe; "
                                f"probe.metrics: {', '.join(self.probe.metrics)}",
                            )
                        )
                    if metric.position == "mean" and not token_mean:
                        problems.append(
                            (
                                (*loc, "when", "metric", "position"),
                                "position 'mean' needs token-mean metrics: set probe.token_mean: "
                                "true",
                            )
                        )
            problems.extend(
                self._check_action(
                    (*base, "default"), policy.default.route, policy.default.fallback
                )
            )
            if policy.on_probe_error not in self.backends:
                problems.append(
                    ((*base, "on_probe_error"), self._unknown_backend(policy.on_probe_error))
                )
            if policy.cascade is not None:
                problems.extend(self._check_cascade((*base, "cascade"), policy.cascade))
        return problems

    def _check_cascade(self, loc: Loc, cascade: Cascade) -> list[tuple[Loc, str]]:
        problems: list[tuple[Loc, str]] = []
        for field in ("backend", "escalate_to"):
            name = getattr(cascade, field)
            if name not in self.backends:
                problems.append(((*loc, field), self._unknown_backend(name)))
            elif isinstance(self.backends[name], HumanBackend):
                problems.append(
                    (
                        (*loc, field),
                        f"{name!r} is a human backend; a cascade checks and escalates between "
                        "model backends (route to a human with a rule instead)",
                    )
                )
        if cascade.backend == cascade.escalate_to:
            problems.append(
                ((*loc, "escalate_to"), "escalate_to must differ from the checked backend")
            )
        if self.calibration.answer_path is None:
            problems.append(
                (
                    loc,
                    "a cascade needs an answer calibration: set calibration.answer_path to a "
                    "file from `sparsity-router calibrate --labels FILE --answer-column NAME`",
                )
            )
        return problems

    def _check_models(self) -> list[tuple[Loc, str]]:
        problems: list[tuple[Loc, str]] = []
        for model, virtual in self.virtual_models.items():
            if virtual.policy not in self.policies:
                hint = (
                    ""
                    if "virtual_models" in self.model_fields_set
                    else " (virtual_models is not set, so the built-in `auto: {policy: default}` "
                    "applies: name a policy 'default' or set virtual_models)"
                )
                problems.append(
                    (
                        ("virtual_models", model, "policy"),
                        f"unknown policy {virtual.policy!r}; known: {_names(self.policies)}{hint}",
                    )
                )
        direct: dict[str, str] = {}
        for name, backend in self.backends.items():
            if not isinstance(backend, OpenAIBackend):
                continue
            for i, model in enumerate(backend.models):
                loc: Loc = ("backends", name, "models", i)
                if model in self.virtual_models:
                    problems.append(
                        (loc, f"model {model!r} is also a virtual model; rename one of them")
                    )
                elif model in direct and direct[model] != name:
                    problems.append(
                        (loc, f"model {model!r} is also served by backend {direct[model]!r}")
                    )
                direct.setdefault(model, name)
        return problems

    def _check_experiments(self) -> list[tuple[Loc, str]]:
        problems: list[tuple[Loc, str]] = []
        names: dict[str, int] = {}
        models: dict[str, int] = {}
        for i, exp in enumerate(self.experiments):
            base: Loc = ("experiments", i)
            if not _NAME.match(exp.name):
                problems.append(
                    (
                        (*base, "name"),
                        f"bad experiment name {exp.name!r}: use letters, digits, '_', '.' and '-'",
                    )
                )
            elif exp.name in names:
                problems.append(
                    (
                        (*base, "name"),
                        f"duplicate experiment name {exp.name!r} "
                        f"(see experiments[{names[exp.name]}])",
                    )
                )
            names.setdefault(exp.name, i)
            if exp.model not in self.virtual_models:
                problems.append(
                    (
                        (*base, "model"),
                        f"{exp.model!r} is not a virtual model; "
                        f"known: {_names(self.virtual_models)}",
                    )
                )
            elif exp.model in models:
                problems.append(
                    (
                        (*base, "model"),
                        f"virtual model {exp.model!r} already has an experiment "
                        f"(experiments[{models[exp.model]}]); one experiment per virtual model: "
                        "set enabled: false on the old one or remove it",
                    )
                )
            models.setdefault(exp.model, i)
            for j, arm in enumerate(exp.arms):
                if arm.policy not in self.policies:
                    problems.append(
                        (
                            (*base, "arms", j, "policy"),
                            f"unknown policy {arm.policy!r}; known: {_names(self.policies)}",
                        )
                    )
        return problems

    # -- helpers for consumers --------------------------------------------------------------

    @property
    def base_dir(self) -> Path | None:
        """The folder of the config file (None when parsed from a string without one)."""
        return self._base_dir

    def resolve_path(self, path: str) -> Path:
        """``path`` with ``~`` expanded, relative paths taken from the config file's folder."""
        p = Path(path).expanduser()
        if p.is_absolute() or self._base_dir is None:
            return p
        return Path(os.path.normpath(self._base_dir / p))

    def calibration_path(self) -> Path | None:
        """The calibration file to load, resolved (None when no calibration is configured)."""
        path = self.calibration.path
        return None if path is None else self.resolve_path(path)

    def answer_calibration_path(self) -> Path | None:
        """The cascades' answer calibration, resolved (None when not configured)."""
        path = self.calibration.answer_path
        return None if path is None else self.resolve_path(path)

    def local_model(self, backend: str) -> str:
        """The model a ``local`` backend runs (its ``model``, else the probe's)."""
        b = self.backends[backend]
        if not isinstance(b, LocalBackend):
            raise TypeError(f"backend {backend!r} is not a local backend")
        return b.model or self.probe.model

    def direct_models(self) -> dict[str, str]:
        """Model name -> backend for direct pass-through (empty when it is switched off)."""
        if not self.server.passthrough_direct_models:
            return {}
        out: dict[str, str] = {}
        for name, backend in self.backends.items():
            if isinstance(backend, OpenAIBackend):
                for model in backend.models:
                    out.setdefault(model, name)
        return out
