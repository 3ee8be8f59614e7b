"""Reload the configuration file of a running gateway (``SIGHUP`` or ``POST /admin/reload``).

What a reload changes without a restart: policies and their rules, virtual models, auth (keys,
scopes, rate limits). Backends, probe, calibration and cache hold connections or a loaded model;
a file that changes them is refused with a message asking for a restart. A file that does not
load (syntax, schema, cross-checks) is refused too: the previous configuration keeps serving,
the error is logged with the YAML path and counted in ``sparsity_router_config_reloads{result}``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread

from policies.engine import PolicyEngine
from policies.loader import load_settings
from policies.schema import Settings
from probes.errors import RouterError
from router.auth import KeyRing
from router.escalations.config import reviewer_keys
from router.ratelimit import build_rate_limiter
from router.state import GatewayState, probe_needed

__all__ = ["ReloadOutcome", "reload_state"]

logger = logging.getLogger(__name__)

_NEEDS_RESTART = ("backends", "probe", "calibration", "cache", "events", "escalation", "tracing")


@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    ok: bool
    message: str
    state: GatewayState


def _rebuild(old: GatewayState, new: Settings) -> GatewayState:
    changed = [name for name in _NEEDS_RESTART if getattr(new, name) != getattr(old.settings, name)]
    if changed:
        raise ValueError(
            f"the new file changes {', '.join(changed)}; those need a restart "
            "(a reload applies policies, experiments, virtual_models and auth)"
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


async def reload_state(old: GatewayState, path: Path) -> ReloadOutcome:
    """Load ``path`` and build the state that replaces ``old``; on any problem, keep ``old``."""
    try:
        new = await anyio.to_thread.run_sync(load_settings, path)
        state = _rebuild(old, new)
    except (RouterError, ValueError) as exc:
        old.metrics.config_reloads.labels("error").inc()
        message = f"config reload from {path} failed; still serving the previous config: {exc}"
        logger.error("%s", message)
        return ReloadOutcome(False, message, old)
    old.metrics.config_reloads.labels("ok").inc()
    logger.info("config reloaded from %s", path)
    if state.rate_limiter is not old.rate_limiter and old.rate_limiter is not None:
        await old.rate_limiter.aclose()
    return ReloadOutcome(True, f"config reloaded from {path}", state)
