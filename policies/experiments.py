"""A/B experiments: which arm (and so which policy) routes a request. Pure; no I/O.

An experiment splits the requests for one virtual model between arms by a sticky hash::

    u = int(sha256(experiment name + "\\0" + key)[:8]) / 2**64        # uniform in [0, 1)
    arm = the first arm whose cumulative weight exceeds u

so a key (a user, an API key, a header's value) always lands in the same arm, in every gateway
process, and the share of keys per arm converges to the weights. Renaming an experiment
reshuffles its keys; changing weights moves only the keys between the old and new boundaries.

A request without the key (no ``user`` field, no such header, no API key) goes to the control
arm (``control``, else the first arm), and so does every request while ``enabled`` is false:
the kill switch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from policies.schema import Experiment, ExperimentArm

__all__ = ["Assignment", "ExperimentRouter", "assign", "bucket", "experiment_key"]

Why = Literal["hash", "no_key", "disabled"]


@dataclass(frozen=True, slots=True)
class Assignment:
    """The arm a request was assigned to. ``why``: ``hash`` (by its key), ``no_key`` (the
    request lacks the key: control) or ``disabled`` (the kill switch is on: control)."""

    experiment: str
    arm: str
    policy: str
    why: Why


def bucket(experiment: str, key: str) -> float:
    """The key's sticky position in [0, 1) for this experiment (sha256, process-independent)."""
    digest = hashlib.sha256(f"{experiment}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _arm_at(arms: Iterable[ExperimentArm], u: float) -> ExperimentArm:
    cumulative = 0.0
    last: ExperimentArm | None = None
    for arm in arms:
        cumulative += arm.weight
        last = arm
        if u < cumulative:
            return arm
    assert last is not None  # the schema requires two arms or more
    return last  # weights add up to 1 within float rounding: u just below 1 lands here


def experiment_key(
    experiment: Experiment, *, user: str | None, headers: Mapping[str, str]
) -> str | None:
    """The request's assignment key for ``experiment`` (None when the request has none).

    ``headers`` must have lower-case names. ``api_key`` is the bearer token of the
    ``Authorization`` header.
    """
    source = experiment.key
    if source == "user":
        value = user
    elif source == "api_key":
        auth = headers.get("authorization", "")
        value = auth[7:].strip() if auth[:7].lower() == "bearer " else None
    else:
        value = headers.get(source[len("header:") :].lower())
    return value if value else None


def assign(experiment: Experiment, key: str | None) -> Assignment:
    """The arm for ``key`` (control when ``key`` is None or the experiment is switched off)."""
    why: Why
    if not experiment.enabled:
        arm, why = experiment.control_arm, "disabled"
    elif key is None:
        arm, why = experiment.control_arm, "no_key"
    else:
        arm, why = _arm_at(experiment.arms, bucket(experiment.name, key)), "hash"
    return Assignment(experiment.name, arm.name, arm.policy, why)


class ExperimentRouter:
    """The experiments of a configuration, by virtual model (at most one per model)."""

    def __init__(self, experiments: Iterable[Experiment]) -> None:
        self._by_model = {e.model: e for e in experiments}

    def for_model(self, model: str) -> Experiment | None:
        return self._by_model.get(model)

    def assign(
        self, model: str, *, user: str | None, headers: Mapping[str, str]
    ) -> Assignment | None:
        """The arm routing a request for ``model``, or None when no experiment runs on it."""
        experiment = self._by_model.get(model)
        if experiment is None:
            return None
        return assign(experiment, experiment_key(experiment, user=user, headers=headers))
