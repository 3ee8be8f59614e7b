"""The escalation store interface; :func:`open_store` builds the configured one.

Every method is a coroutine; ``now`` is wall-clock seconds (``time.time()``), passed in so that
tests and the two implementations agree on one clock. Transitions are atomic: of several
concurrent ``answer`` calls (several tasks, processes or gateways) exactly one applies.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from policies.schema import EscalationSettings
from router.escalations.model import Escalation, NewEscalation, Op

__all__ = ["EscalationStore", "open_store"]


class EscalationStore(Protocol):
    kind: str

    async def create(self, new: NewEscalation, now: float) -> Escalation: ...

    async def get(self, id: str, now: float) -> Escalation | None: ...

    async def query(
        self, statuses: Iterable[str], now: float, limit: int = 200
    ) -> list[Escalation]:
        """Oldest first; ``pending`` includes claims whose lease ran out."""
        ...

    async def transition(
        self, id: str, op: Op, who: str, text: str, now: float, lease_until: float | None = None
    ) -> Escalation:
        """Apply ``op``; raises StoreMissing or StoreConflict. A repeat of the same answer or
        rejection by the same reviewer returns the record unchanged."""
        ...

    async def due_for_expiry(self, before: float, now: float) -> list[str]:
        """Ids of open escalations created before ``before``."""
        ...

    async def purge(self, before: float, now: float) -> int:
        """Delete closed escalations created before ``before``; how many were deleted."""
        ...

    async def count_open(self, now: float) -> int: ...

    async def aclose(self) -> None: ...


def open_store(
    settings: EscalationSettings, *, path: Path, redis_url: str | None
) -> EscalationStore:
    """The configured store (``path`` resolved against the config file, ``redis_url`` with the
    cache's as default)."""
    if settings.store == "redis":
        from router.escalations.redis_store import RedisEscalationStore

        if redis_url is None:
            raise ValueError("escalation.store is 'redis' but no redis_url is configured")
        return RedisEscalationStore(redis_url, prefix=settings.key_prefix)
    from router.escalations.sqlite_store import SQLiteEscalationStore

    return SQLiteEscalationStore(path)
