"""The ``virtual_models:`` and ``policies:`` sections: rules, their conditions, and cascades.

A rule is ``{name, when: Condition, route: backend, fallback: [backends]}``; the conditions of a
``when`` are ANDed. ``share: s`` hands the rule the sparsest ``s`` of reference traffic,
cumulatively with the share rules before it in the same policy: rules with shares 0.02 then
0.28 match percentiles >= 0.98 and >= 0.70 (the threshold is ``1 - cumulative share``).

A request with no readable text (only image, audio or file parts, or blank text) is never
probed: ``has_text: false`` rules match it, and the policy's ``on_no_text`` action (default: its
``default``) takes it where a rule would need the probe.

Conditions on the request's shape (``has_tools``, ``has_images``, ``response_format``,
``n_messages``) need no probe; what a request needs of its backend (tools, vision, json) is
checked against the backends' ``capabilities`` after the decision (docs/routing.md).

A rule may route to the best of several backends instead of one: ``route: {best_of: [a, b, c],
willingness_to_pay: λ, max_cost_per_mtok: C}`` sends each request to the allowed backend
(cost at most ``C``) with the highest ``predicted quality - λ · cost``, from the calibration's
N-way model (``calibrate --labels F --models ...``; docs/routing.md, "N-way routing").

Checks needing other sections (backend names, a calibration for percentile rules, metrics the
probe measures) are the root's (:mod:`policies.schema.checks`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from policies.schema.common import ConfigModel, Problem, SchemaProblems, as_tuple

__all__ = [
    "Action",
    "Band",
    "BestOf",
    "Cascade",
    "CascadeCondition",
    "Condition",
    "IntBand",
    "MetricCondition",
    "PercentileBand",
    "Policy",
    "ResponseFormat",
    "Rule",
    "VirtualModel",
]

#: The ``type`` of a request's ``response_format`` (``text`` when it has none).
ResponseFormat = Literal["text", "json_object", "json_schema"]
#: Cumulative shares may exceed 1 by this much (float rounding of e.g. 0.1 + 0.2 + 0.7).
_SHARE_SLACK: Final = 1e-9
_MIN = "lower end, included; null: open"
_MAX = "upper end, excluded; null: open"


class Band(ConfigModel):
    """A half-open interval ``[min, max)``; either end may be left open, not both."""

    min: float | None = Field(None, description=_MIN)
    max: float | None = Field(None, description=_MAX)

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
    """A band of values in [0, 1] (a percentile, a probability). ``max: 1`` includes 1."""

    min: float | None = Field(None, ge=0, le=1, description=_MIN)
    max: float | None = Field(None, ge=0, le=1, description=_MAX + " (1 included)")

    def contains(self, value: float) -> bool:
        if self.max is not None and self.max >= 1 and value >= 1:
            return self.min is None or value >= self.min
        return Band.contains(self, value)


class IntBand(ConfigModel):
    """An integer interval ``[min, max)`` (token or message counts); either end may be left
    open."""

    min: int | None = Field(None, ge=0, description=_MIN)
    max: int | None = Field(None, ge=0, description=_MAX)

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

    layer: int = Field(description="probe layer (0: embeddings; negative: from the end)")
    name: str = Field(description="a metric the probe measures (one of probe.metrics)")
    position: Literal["last", "mean"] = Field(
        "last",
        description="last: the last prompt token; mean: averaged over tokens "
        "(needs probe.token_mean)",
    )


class Condition(ConfigModel):
    """What a request must satisfy for a rule to apply; all given fields must hold (AND)."""

    always: bool | None = Field(
        None, description="true: matches every request (combined with nothing else)"
    )
    percentile: PercentileBand | None = Field(
        None,
        description="the score's percentile of reference traffic lies in this band "
        "(needs calibration.path)",
    )
    share: float | None = Field(
        None,
        gt=0,
        le=1,
        description="the sparsest share of reference traffic, counted after the share rules "
        "before it in the policy (needs calibration.path; not with percentile)",
    )
    p_large: PercentileBand | None = Field(
        None,
        description="P(large model does better) lies in this band; from a calibration fitted "
        "with --labels",
    )
    score: Band | None = Field(
        None, description="the raw score (higher: sparser) lies in this band; needs no calibration"
    )
    metric: MetricCondition | None = Field(
        None, description="a raw metric value at one layer lies in this band"
    )
    n_tokens: IntBand | None = Field(
        None, description="the probed prompt's token count lies in this band"
    )
    model: tuple[str, ...] | None = Field(None, description="requested model name(s)")
    user: tuple[str, ...] | None = Field(None, description="the request's `user` field")
    header: dict[str, tuple[str, ...]] | None = Field(
        None, description="header name (any case) -> accepted value(s)"
    )
    metadata: dict[str, tuple[str, ...]] | None = Field(
        None, description="request metadata key -> accepted value(s)"
    )
    has_text: bool | None = Field(
        None,
        description="true: the request holds readable text; false: it holds none (only image, "
        "audio or file parts, or blank text), so it is never probed",
    )
    has_tools: bool | None = Field(
        None,
        description="true: the request offers tools (a non-empty `tools` or `functions`); "
        "false: it offers none",
    )
    has_images: bool | None = Field(
        None,
        description="true: a message holds an image (an `image_url` or `input_image` part); "
        "false: none does",
    )
    response_format: tuple[ResponseFormat, ...] | None = Field(
        None,
        description="the request's response_format.type, one or several of text, json_object, "
        "json_schema (no response_format: text)",
    )
    n_messages: IntBand | None = Field(
        None,
        description="the number of chat messages lies in this band (a /v1/completions prompt: 0)",
    )

    @field_validator("model", "user", "response_format", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return as_tuple(v)

    @field_validator("header", "metadata", mode="before")
    @classmethod
    def _values(cls, v: Any) -> Any:
        if isinstance(v, Mapping):
            return {k: as_tuple(x) for k, x in v.items()}
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
        for name in ("model", "user", "response_format"):
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


class Action(ConfigModel):
    """Where to send a request: a backend and, optionally, a fallback list overriding its own.

    In YAML a bare backend name stands for ``{route: NAME}``.
    """

    route: str = Field(description="the backend that answers")
    fallback: tuple[str, ...] | None = Field(
        None, description="overrides the backend's fallback; null: the backend's own"
    )

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, v: Any) -> Any:
        return {"route": v} if isinstance(v, str) else v

    @field_validator("fallback", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return as_tuple(v)


class BestOf(ConfigModel):
    """N-way routing: the backend whose model has the highest predicted quality minus
    ``willingness_to_pay`` times its cost, among ``best_of`` (those within the cost caps).

    Predictions come from the calibration's N-way model (``calibrate --labels F --models
    a,b,c``); each backend's model (its ``model``, else its name) must be one of it, and costs
    are the calibration's (USD per million tokens or per request)."""

    best_of: tuple[str, ...] = Field(
        min_length=2, description="the candidate backends (at least two, each once)"
    )
    willingness_to_pay: float = Field(
        0.0,
        ge=0,
        description="quality given up per unit of cost (0: the best predicted quality, cost "
        "breaking ties)",
    )
    max_cost_per_mtok: float | None = Field(
        None,
        ge=0,
        description="only backends costing at most this, in USD per million tokens (needs "
        "costs per million tokens in the calibration)",
    )
    max_cost_per_request: float | None = Field(
        None,
        ge=0,
        description="only backends costing at most this, in USD per request (needs costs per "
        "request in the calibration)",
    )

    @field_validator("best_of", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return as_tuple(v)

    @model_validator(mode="after")
    def _distinct(self) -> BestOf:
        repeated = sorted({b for b in self.best_of if self.best_of.count(b) > 1})
        if repeated:
            raise ValueError(f"best_of names {', '.join(repeated)} more than once")
        if self.max_cost_per_mtok is not None and self.max_cost_per_request is not None:
            raise ValueError("give max_cost_per_mtok or max_cost_per_request, not both")
        return self

    @property
    def max_cost(self) -> tuple[float, str] | None:
        """(the cost cap, its unit as in the calibration: usd_per_mtok / usd_per_request)."""
        if self.max_cost_per_mtok is not None:
            return self.max_cost_per_mtok, "usd_per_mtok"
        if self.max_cost_per_request is not None:
            return self.max_cost_per_request, "usd_per_request"
        return None

    def __str__(self) -> str:
        return f"best_of({', '.join(self.best_of)})"


class Rule(ConfigModel):
    """``when`` the condition holds, ``route`` to a backend (first matching rule wins)."""

    name: str | None = Field(
        None, description="shown in decisions, events and metrics; default: rules[i]"
    )
    when: Condition = Field(description="the condition; every key given must hold")
    route: str | BestOf = Field(
        description="the backend for requests this rule matches, or {best_of: [backends], "
        "willingness_to_pay, max_cost_per_mtok}: the best of several by the calibration's "
        "N-way model"
    )
    fallback: tuple[str, ...] | None = Field(
        None, description="overrides the backend's fallback; null: the backend's own"
    )

    @field_validator("fallback", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return as_tuple(v)

    @field_validator("route", mode="before")
    @classmethod
    def _name_or_best_of(cls, v: Any) -> Any:
        """A backend name or a ``best_of`` mapping, with errors at the mapping's own keys."""
        if isinstance(v, str | BestOf):
            return v
        if not isinstance(v, Mapping):
            raise ValueError("give a backend name, or {best_of: [backends], ...}")
        try:
            return BestOf.model_validate(v)
        except ValidationError as exc:
            allowed = ", ".join(BestOf.model_fields)
            raise SchemaProblems(
                [
                    (
                        tuple(err["loc"]),
                        f"unknown key; allowed: {allowed}"
                        if err["type"] == "extra_forbidden"
                        else err["msg"].removeprefix("Value error, "),
                    )
                    for err in exc.errors()
                ]
            ) from None


class CascadeCondition(ConfigModel):
    """When a cascade escalates: the checked answer's P(the large model does better)."""

    p_large: PercentileBand = Field(
        description="escalate when the answer's P(the large model does better) lies in this band"
    )


class Cascade(ConfigModel):
    """Check ``backend``'s answers before returning them.

    A request the policy sends to ``backend`` is answered by it first (non-streaming); the probe
    then reads the prompt plus that answer, and the answer calibration
    (``calibration.answer_path``) gives P(the large model does better). When P lies in ``when``
    the request is sent to ``escalate_to`` (streamed if the client asked), otherwise the first
    answer is returned (as a stream if the client asked for one).
    """

    backend: str = Field(description="the backend whose answers are checked (the small model)")
    escalate_to: str = Field(description="the backend asked instead when the check fails")
    when: CascadeCondition = Field(description="escalate when the answer's P lies in this band")
    on_probe_error: Literal["keep", "escalate"] = Field(
        "keep", description="when the answer cannot be probed: return it, or escalate"
    )


class Policy(ConfigModel):
    """Ordered rules, the action when none matches, the backend used when the probe fails, the
    action for requests with no text to probe; optionally a cascade that checks one backend's
    answers."""

    rules: tuple[Rule, ...] = Field(
        (), description="tried in order; the first whose condition holds routes the request"
    )
    default: Action = Field(
        description="where requests no rule matches go: a backend name, or {route, fallback}"
    )
    on_probe_error: str = Field(description="backend for requests whose probe failed")
    on_no_text: Action | None = Field(
        None,
        description="where requests with no readable text go (only image, audio or file parts, "
        "or blank text: nothing to probe), rule `no_text`; null: the default action",
    )
    cascade: Cascade | None = Field(
        None, description="check one backend's answers before returning them; null: no check"
    )

    @field_validator("rules")
    @classmethod
    def _named(cls, v: tuple[Rule, ...]) -> tuple[Rule, ...]:
        return tuple(
            r if r.name is not None else r.model_copy(update={"name": f"rules[{i}]"})
            for i, r in enumerate(v)
        )

    @model_validator(mode="after")
    def _rules_consistent(self) -> Policy:
        problems: list[Problem] = []
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


class VirtualModel(ConfigModel):
    """A model name clients may request (``auto``) that is routed by a policy."""

    policy: str = Field(description="the policy that routes requests for this model")
