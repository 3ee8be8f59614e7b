"""The root of the configuration: :class:`Settings`, one field per section of the YAML file.

Each section validates itself; what spans sections is :func:`policies.schema.checks.cross_check`,
run once the whole file is parsed. Build a :class:`Settings` with
:func:`policies.loader.load_settings` (YAML, env interpolation, line-numbered errors) or
``Settings.model_validate(data, context={"base_dir": folder})``.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, PrivateAttr, ValidationInfo, model_validator

from policies.schema.backends import Backend, HumanBackend, LocalBackend, OpenAIBackend
from policies.schema.checks import cross_check
from policies.schema.common import ConfigModel, SchemaProblems
from policies.schema.escalation import EscalationSettings, EventsSettings
from policies.schema.experiments import Experiment
from policies.schema.labelling import LabellingSettings
from policies.schema.probe import CacheSettings, CalibrationSettings, ProbeSection
from policies.schema.rules import Policy, VirtualModel
from policies.schema.server import AuthSettings, ServerSettings
from policies.schema.tracing import TracingSettings

__all__ = ["Settings"]


def _default_virtual_models() -> dict[str, VirtualModel]:
    return {"auto": VirtualModel(policy="default")}


class Settings(ConfigModel):
    """The whole configuration file.

    Only ``backends`` and ``policies`` are required; every other section has defaults. Values
    may use ``${VAR}`` (an error when VAR is unset) and ``${VAR:-default}`` (the default when
    VAR is unset or empty); ``$${`` is a literal ``${``. Relative paths are taken from the
    config file's folder. Unknown keys are errors.
    """

    server: ServerSettings = Field(ServerSettings(), description="the HTTP listener")
    auth: AuthSettings = Field(
        AuthSettings(), description="API keys and rate limits; no keys: the gateway is open"
    )
    probe: ProbeSection = Field(
        ProbeSection(), description="the probe model, its score, and how the gateway runs it"
    )
    calibration: CalibrationSettings = Field(
        CalibrationSettings(), description="raw score -> percentile (and answer) calibrations"
    )
    cache: CacheSettings = Field(CacheSettings(), description="where probe results are cached")
    backends: dict[str, Backend] = Field(
        min_length=1, description="backend name -> an openai, local or human backend"
    )
    virtual_models: dict[str, VirtualModel] = Field(
        default_factory=_default_virtual_models,
        description="model name clients request -> the policy routing it",
    )
    policies: dict[str, Policy] = Field(
        min_length=1, description="policy name -> rules, default and on_probe_error"
    )
    experiments: tuple[Experiment, ...] = Field(
        (), description="A/B tests splitting a virtual model's requests between policies"
    )
    escalation: EscalationSettings | None = Field(
        None, description="the human-escalation queue (used by human backends)"
    )
    events: EventsSettings | None = Field(
        None, description="per-request records for reports and feedback; null: none"
    )
    tracing: TracingSettings = Field(
        TracingSettings(), description="OpenTelemetry spans of every request; off by default"
    )
    labelling: LabellingSettings = Field(
        LabellingSettings(),
        description="label a sample of the traffic with shadow calls and a judge, for "
        "sparsity-router learn; off by default",
    )

    _base_dir: Path | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _cross_check(self, info: ValidationInfo) -> Settings:
        if info.context and info.context.get("base_dir") is not None:
            self._base_dir = Path(info.context["base_dir"])
        problems = cross_check(
            probe=self.probe,
            calibration=self.calibration,
            cache=self.cache,
            backends=self.backends,
            virtual_models=self.virtual_models,
            virtual_models_given="virtual_models" in self.model_fields_set,
            policies=self.policies,
            experiments=self.experiments,
            escalation=self.escalation,
            labelling=self.labelling,
            events=self.events,
        )
        if problems:
            raise SchemaProblems(problems)
        return self

    # -- helpers for consumers --------------------------------------------------------------

    def escalation_settings(self) -> EscalationSettings | None:
        """The escalation queue's settings when a human backend exists (defaults if unset)."""
        if not any(isinstance(b, HumanBackend) for b in self.backends.values()):
            return None
        return self.escalation or EscalationSettings()

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
