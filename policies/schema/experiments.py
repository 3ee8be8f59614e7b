"""The ``experiments:`` section: A/B tests splitting one virtual model's requests between
policies by a sticky hash.

Whether the named virtual model and policies exist is the root's cross-check
(:mod:`policies.schema.checks`).
"""

from __future__ import annotations

import math

from pydantic import Field, field_validator, model_validator

from policies.schema.common import ConfigModel, Problem, SchemaProblems, known_names

__all__ = ["Experiment", "ExperimentArm"]


class ExperimentArm(ConfigModel):
    """One arm of an experiment: the policy its requests are routed by, its share, and
    optionally the prompt calibration its requests are read with (an A/B test of calibrations:
    two arms with the same policy and different calibrations)."""

    name: str = Field(description="unique within the experiment; recorded with each event")
    policy: str = Field(description="the policy routing this arm's requests")
    weight: float = Field(gt=0, le=1, description="share of the keys; the arms' weights add to 1")
    calibration: str | None = Field(
        None,
        description="calibration JSON this arm's requests are read with instead of "
        "calibration.path (relative to the config file's folder; checked against the probe "
        "like calibration.path, at start-up and on every reload); null: the gateway's",
    )

    @field_validator("calibration")
    @classmethod
    def _not_blank(cls, v: str | None) -> str | None:
        return None if v is not None and not v.strip() else v


class Experiment(ConfigModel):
    """An A/B test: requests for ``model`` are split between arms by a sticky hash of ``key``.

    ``key``: ``user`` (the request's ``user`` field), ``api_key`` (the client's bearer key) or
    ``header:<name>``. A request without the key goes to the ``control`` arm (default: the
    first arm), and so does every request while ``enabled`` is false (the kill switch).
    """

    name: str = Field(description="unique; letters, digits, '_', '.' and '-'")
    model: str = Field("auto", description="the virtual model whose requests are split")
    key: str = Field("user", description="user | api_key | header:<name>")
    arms: tuple[ExperimentArm, ...] = Field(description="two or more arms")
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
        problems: list[Problem] = []
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
            problems.append(
                (("control",), f"unknown arm {self.control!r}; arms: {known_names(seen)}")
            )
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
