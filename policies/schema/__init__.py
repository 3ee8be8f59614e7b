"""The whole configuration file as pydantic v2 models; :class:`Settings` is the root.

Every key, its type, default and meaning is documented on the models themselves
(``Field(description=...)``); ``docs/configuration.md`` is generated from them by
:mod:`policies.reference`. Sections (every model forbids unknown keys), by module::

    server, auth                 policies.schema.server
    probe, calibration, cache    policies.schema.probe
    backends                     policies.schema.backends      (openai | local | human, on `type`)
    virtual_models, policies     policies.schema.rules         (rules, conditions, cascades)
    experiments                  policies.schema.experiments
    escalation, events           policies.schema.escalation
    labelling                    policies.schema.labelling
    tracing                      policies.schema.tracing
    the root                     policies.schema.settings      (Settings)
    cross-checks                 policies.schema.checks
    shared helpers               policies.schema.common        (Loc, SchemaProblems, format_loc)

Cross-checks (unknown backends and policies, fallback cycles, shares adding up to more than 1,
percentile rules without a calibration, ...) raise :class:`SchemaProblems`, a ``ValueError``
that carries the location of every problem relative to the model that raised it, so that
:mod:`policies.loader` can point at the offending line of the YAML file.

Parsing a configuration needs neither torch nor transformers: the probe's settings come from
the torch-free :mod:`probes.types`.
"""

from __future__ import annotations

from policies.schema.backends import (
    CAPABILITIES,
    Backend,
    Backoff,
    Breaker,
    Capability,
    HumanBackend,
    LocalBackend,
    OpenAIBackend,
    Price,
    RoutableBackend,
    Timeouts,
)
from policies.schema.common import Loc, SchemaProblems, format_loc
from policies.schema.escalation import EscalationSettings, EventsSettings, WebhookSettings
from policies.schema.experiments import Experiment, ExperimentArm
from policies.schema.labelling import LabellingSettings, ReferenceSettings
from policies.schema.probe import (
    BatchingSettings,
    CacheSettings,
    CalibrationSettings,
    MemoryCacheSettings,
    ProbeSection,
    RedisCacheSettings,
    VllmProbeSettings,
)
from policies.schema.rules import (
    Action,
    Band,
    BestOf,
    Cascade,
    CascadeCondition,
    Condition,
    IntBand,
    MetricCondition,
    PercentileBand,
    Policy,
    ResponseFormat,
    Rule,
    VirtualModel,
)
from policies.schema.server import ApiKey, AuthSettings, RateLimitSettings, ServerSettings
from policies.schema.settings import Settings
from policies.schema.tracing import TracingSettings

__all__ = [
    "CAPABILITIES",
    "Action",
    "ApiKey",
    "AuthSettings",
    "Backend",
    "Backoff",
    "Band",
    "BatchingSettings",
    "BestOf",
    "Breaker",
    "CacheSettings",
    "CalibrationSettings",
    "Capability",
    "Cascade",
    "CascadeCondition",
    "Condition",
    "EscalationSettings",
    "EventsSettings",
    "Experiment",
    "ExperimentArm",
    "HumanBackend",
    "IntBand",
    "LabellingSettings",
    "Loc",
    "LocalBackend",
    "MemoryCacheSettings",
    "MetricCondition",
    "OpenAIBackend",
    "PercentileBand",
    "Policy",
    "Price",
    "ProbeSection",
    "RateLimitSettings",
    "RedisCacheSettings",
    "ReferenceSettings",
    "ResponseFormat",
    "RoutableBackend",
    "Rule",
    "SchemaProblems",
    "ServerSettings",
    "Settings",
    "Timeouts",
    "TracingSettings",
    "VirtualModel",
    "VllmProbeSettings",
    "WebhookSettings",
    "format_loc",
]
