"""Descriptions of the human tier for ``sparsity-router check``, and the store it opens."""

from __future__ import annotations

from policies.schema import HumanBackend, Settings
from router.escalations.metrics import EscalationMetrics
from router.escalations.service import EscalationService
from router.escalations.store import open_store

__all__ = ["build_escalations", "describe_human", "reviewer_keys"]


def describe_human(backend: object, settings: Settings) -> str:
    if not isinstance(backend, HumanBackend):  # pragma: no cover - the schema has three types
        return type(backend).__name__
    esc = settings.escalation_settings()
    assert esc is not None
    if esc.store == "sqlite":
        store = f"sqlite {settings.resolve_path(esc.path)}"
    else:
        store = "redis"
    if backend.mode == "hold":
        mode = f"hold {backend.wait_s:g} s, then {backend.on_timeout}"
    else:
        mode = "ticket"
    return f"human ({mode}; queue: {store}, lease {esc.lease_s:g} s, expiry {esc.expire_s:g} s)"


def build_escalations(settings: Settings, metrics: EscalationMetrics) -> EscalationService | None:
    """The escalation service when a human backend is configured, else None."""
    esc = settings.escalation_settings()
    if esc is None:
        return None
    redis_url = esc.redis_url or (settings.cache.redis.url if settings.cache.redis else None)
    store = open_store(esc, path=settings.resolve_path(esc.path), redis_url=redis_url)
    return EscalationService(esc, store, metrics)


def reviewer_keys(settings: Settings) -> tuple[str, ...]:
    """``escalation.reviewer_keys`` (reviewer scope in the key ring), when escalation is on."""
    esc = settings.escalation_settings()
    return esc.reviewer_keys if esc is not None else ()
