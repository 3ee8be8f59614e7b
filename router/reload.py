"""Reload the configuration file of a running gateway (``SIGHUP`` or ``POST /admin/reload``).

What a reload changes without a restart: policies and their rules, virtual models, auth (keys,
scopes, rate limits) and the calibrations. Backends, probe and cache hold connections or a loaded
model; a file that changes them is refused with a message asking for a restart. A file that does
not load (syntax, schema, cross-checks) is refused too: the previous configuration keeps serving,
the error is logged with the YAML path and counted in ``sparsity_router_config_reloads{result}``.

Every reload re-reads the calibration files (``calibration.path``, ``calibration.answer_path``,
each experiment arm's ``calibration``), also when their paths did not change: replacing the
file and reloading swaps the calibration. They are checked as at start-up (the probe's
fingerprint, what a supervised model reads, what the policies need of it) before anything is
swapped; a missing, corrupt or mismatched file keeps the previous calibrations (and config)
serving, and is counted in ``sparsity_router_calibration_reload_failures_total`` too. The swap
replaces the whole ``GatewayState``: a request reads it once, so it finishes with the
calibration it began with.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import anyio.to_thread

from policies.engine import PolicyEngine
from policies.loader import load_settings
from policies.schema import Settings
from probes.calibration import Calibration
from probes.errors import CalibrationError, RouterError
from router.auth import KeyRing
from router.escalations.config import reviewer_keys
from router.ratelimit import build_rate_limiter
from router.state import (
    ArmKey,
    GatewayState,
    load_arm_calibrations,
    load_calibrations,
    probe_needed,
)

if TYPE_CHECKING:
    from probes.probe import SparsityProbe
    from router.remote_probe import RemoteProbe

__all__ = ["ReloadOutcome", "reload_state"]

logger = logging.getLogger(__name__)

_NEEDS_RESTART = ("backends", "probe", "cache", "events", "escalation", "tracing", "labelling")


@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    ok: bool
    message: str
    state: GatewayState
    #: why it failed, the error envelope's code: config_invalid or calibration_invalid
    code: str = "config_invalid"


def _rebuild(old: GatewayState, new: Settings) -> GatewayState:
    changed = [name for name in _NEEDS_RESTART if getattr(new, name) != getattr(old.settings, name)]
    if changed:
        raise ValueError(
            f"the new file changes {', '.join(changed)}; those need a restart "
            "(a reload applies policies, experiments, virtual_models, auth and calibration)"
        )
    engine = PolicyEngine(new, n_layers=old.engine.n_layers)
    if old.probe is None and probe_needed(new, engine):
        raise ValueError("the new policies need the probe, which is not loaded; restart")
    limiter = old.rate_limiter
    if new.auth.rate_limit != old.settings.auth.rate_limit:
        limiter = build_rate_limiter(
            new.auth.rate_limit,
            new.cache.redis.url if new.cache.redis is not None else None,
            on_redis_error=old.metrics.rate_limit_redis_errors.inc,
        )
    return dataclasses.replace(
        old,
        settings=new,
        engine=engine,
        api_keys=tuple(k.encode() for k in new.auth.api_keys),
        keys=KeyRing.from_settings(new.auth, reviewer_keys=reviewer_keys(new)),
        rate_limiter=limiter,
    )


def _calibrations(
    old: GatewayState, new: Settings
) -> tuple[Calibration | None, Calibration | None]:
    """The calibrations ``new`` names, read afresh and checked against the running probe
    (none without a probe: build_state loads none then either), their ids computed (a worker
    thread runs this)."""
    if old.probe is None:
        return None, None
    prober = cast("SparsityProbe | RemoteProbe", old.probe.probe)
    calibration, answer = load_calibrations(new, prober)
    for loaded in (calibration, answer):  # the id digests the whole file: here, off the loop
        if loaded is not None:
            _ = loaded.id
    return calibration, answer


def _arm_calibrations(old: GatewayState, new: Settings) -> dict[ArmKey, Calibration]:
    """The experiment arms' calibrations ``new`` names, read afresh and checked as
    :func:`_calibrations` checks the main one (a worker thread runs this)."""
    if old.probe is None:
        return {}
    prober = cast("SparsityProbe | RemoteProbe", old.probe.probe)
    arms = load_arm_calibrations(new, prober)
    for loaded in arms.values():
        _ = loaded.id
    return arms


def _describe(old: GatewayState, state: GatewayState) -> str:
    """What the calibrations are now, for the log and the answer."""
    was, now = old.calibration_ids(), state.calibration_ids()
    kinds = [*now, *(kind for kind in was if kind not in now)]  # an arm may come or go
    parts = [
        f"{kind} calibration {now.get(kind) or 'none'}"
        + (f" (was {was.get(kind) or 'none'})" if was.get(kind) != now.get(kind) else "")
        for kind in kinds
        if now.get(kind) is not None or was.get(kind) is not None
    ]
    return "; " + ", ".join(parts) if parts else ""


async def reload_state(old: GatewayState, path: Path) -> ReloadOutcome:
    """Load ``path`` and build the state that replaces ``old``; on any problem, keep ``old``."""
    code = "config_invalid"
    try:
        new = await anyio.to_thread.run_sync(load_settings, path)
        state = _rebuild(old, new)
        code = "calibration_invalid"
        calibration, answer = await anyio.to_thread.run_sync(_calibrations, old, new)
        arms = await anyio.to_thread.run_sync(_arm_calibrations, old, new)
    except (RouterError, ValueError) as exc:
        old.metrics.config_reloads.labels("error").inc()
        if isinstance(exc, CalibrationError) and code == "calibration_invalid":
            old.metrics.calibration_reload_failures.inc()
            message = (
                f"config reload from {path} failed: {exc}; still serving the previous config "
                f"and calibration ({old.calibration_ids()['prompt'] or 'none'})"
            )
        else:
            code = "config_invalid"
            message = f"config reload from {path} failed; still serving the previous config: {exc}"
        logger.error("%s", message)
        return ReloadOutcome(False, message, old, code)
    state = dataclasses.replace(
        state, calibration=calibration, answer_calibration=answer, arm_calibrations=arms
    )
    if old.probe is not None:  # the service's default (readiness reads it); requests pass theirs
        old.probe.calibration = calibration
    state.metrics.record_calibrations(state.calibration_ids())
    old.metrics.config_reloads.labels("ok").inc()
    described = _describe(old, state)
    logger.info("config reloaded from %s%s", path, described)
    if state.rate_limiter is not old.rate_limiter and old.rate_limiter is not None:
        await old.rate_limiter.aclose()
    return ReloadOutcome(True, f"config reloaded from {path}{described}", state)
