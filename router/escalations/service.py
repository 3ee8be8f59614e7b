"""The escalation queue as the gateway uses it: the store plus metrics, webhook, expiry, and
waiting for an answer.

A request in hold mode waits in :meth:`EscalationService.wait`: woken at once by a transition in
this process, by the Redis event stream for transitions in other processes (``store: redis``),
and otherwise by polling the store every ``poll_s`` (several processes on one SQLite file).
A sweeper task expires escalations older than ``expire_s``, deletes closed ones older than
``retention_s``, and refreshes the pending gauge.

Webhooks: with SQLite the process that created an escalation delivers it. With Redis every
gateway process reads the event stream in one consumer group (``webhook``), so each new
escalation is delivered by exactly one process; an entry a dead process left unacknowledged
for ``_RECLAIM_IDLE_MS`` is taken over (``XAUTOCLAIM``) by another.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from policies.schema import EscalationSettings
from router.escalations.metrics import EscalationMetrics
from router.escalations.model import Escalation, NewEscalation, Op
from router.escalations.store import EscalationStore
from router.escalations.webhook import Webhook

__all__ = ["EscalationService"]

logger = logging.getLogger(__name__)

_GROUP = "webhook"
_RECLAIM_IDLE_MS = 60_000


class EscalationService:
    def __init__(
        self,
        settings: EscalationSettings,
        store: EscalationStore,
        metrics: EscalationMetrics,
        *,
        clock: Callable[[], float] = time.time,
        poll_s: float = 0.5,
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.poll_s = poll_s
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.webhook: Webhook | None = None
        if settings.webhook is not None:
            self.webhook = Webhook(
                settings.webhook,
                on_delivered=metrics.webhook.labels("delivered").inc,
                on_failed=metrics.webhook.labels("failed").inc,
            )

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._sweep_forever()))
        if self.store.kind == "redis":
            self._tasks.append(loop.create_task(self._follow_redis()))
            if self.webhook is not None:
                await self._create_group()
                self._tasks.append(loop.create_task(self._deliver_from_group()))

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks.clear()
        if self.webhook is not None:
            await self.webhook.aclose()
        await self.store.aclose()

    # -- operations ------------------------------------------------------------------------

    async def create(self, new: NewEscalation) -> Escalation:
        record = await self.store.create(new, self.clock())
        self.metrics.created.labels(new.backend, new.mode).inc()
        self.metrics.open.inc()
        logger.info(
            "escalation %s created (rule %s, policy %s, mode %s)",
            record.id,
            new.rule,
            new.policy,
            new.mode,
        )
        if self.webhook is not None and self.store.kind != "redis":
            self.webhook.notify(_summary(record))  # Redis: the consumer group delivers it
        return record

    async def get(self, id: str) -> Escalation | None:
        return await self.store.get(id, self.clock())

    async def query(self, statuses: Iterable[str], limit: int = 200) -> list[Escalation]:
        return await self.store.query(statuses, self.clock(), limit)

    async def claim(self, id: str, reviewer: str) -> Escalation:
        now = self.clock()
        return await self._transition(id, "claim", reviewer, "", now, now + self.settings.lease_s)

    async def answer(self, id: str, reviewer: str, content: str) -> Escalation:
        return await self._transition(id, "answer", reviewer, content, self.clock())

    async def reject(self, id: str, reviewer: str, reason: str) -> Escalation:
        return await self._transition(id, "reject", reviewer, reason, self.clock())

    async def expire(self, id: str, reason: str) -> Escalation:
        return await self._transition(id, "expire", "", reason, self.clock())

    async def _transition(
        self, id: str, op: Op, who: str, text: str, now: float, lease_until: float | None = None
    ) -> Escalation:
        record = await self.store.transition(id, op, who, text, now, lease_until)
        if record.closed and record.updated == now:  # applied now (not an idempotent repeat)
            self.metrics.closed.labels(record.status).inc()
            self.metrics.open.dec()
            logger.info("escalation %s %s by %s", id, record.status, who or "the gateway")
        self._notify(id)
        return record

    async def wait(self, id: str, timeout_s: float) -> Escalation | None:
        """The escalation once closed (answered, rejected, expired), or None past ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        event = asyncio.Event()
        self._waiters.setdefault(id, set()).add(event)
        try:
            while True:
                event.clear()
                record = await self.store.get(id, self.clock())
                if record is not None and record.closed:
                    return record
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                try:
                    await asyncio.wait_for(event.wait(), min(left, self.poll_s))
                except TimeoutError:
                    pass
        finally:
            waiters = self._waiters.get(id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[id]

    def _notify(self, id: str) -> None:
        for event in self._waiters.get(id, ()):
            event.set()

    # -- background ------------------------------------------------------------------------

    async def sweep(self) -> int:
        """Expire what is due and refresh the pending gauge; the number expired."""
        now = self.clock()
        expired = 0
        for id in await self.store.due_for_expiry(now - self.settings.expire_s, now):
            try:
                await self.expire(id, f"nobody answered within {self.settings.expire_s:g} s")
                expired += 1
            except LookupError:
                continue
            except Exception as exc:  # a conflict: closed meanwhile
                logger.debug("expiring %s: %s", id, exc)
        retention = self.settings.retention_s
        if retention is not None:
            purged = await self.store.purge(now - retention, now)
            if purged:
                logger.info("deleted %d closed escalations older than %g s", purged, retention)
        self.metrics.open.set(await self.store.count_open(self.clock()))
        return expired

    async def _sweep_forever(self) -> None:
        interval = max(0.2, min(5.0, self.settings.expire_s / 4, self.settings.lease_s / 4))
        while True:
            try:
                await self.sweep()
            except Exception:
                logger.exception("escalation sweep failed; retrying in %.1f s", interval)
            await asyncio.sleep(interval)

    async def _follow_redis(self) -> None:
        """Wake local waiters on transitions made by other gateway processes."""
        from router.escalations.redis_store import RedisEscalationStore

        store = self.store
        assert isinstance(store, RedisEscalationStore)
        last = "$"
        while True:
            try:
                replies: Any = await store.client.xread(
                    {store.events_key: last}, block=1000, count=100
                )
                for _stream, entries in replies or ():
                    for entry_id, fields in entries:
                        last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                        raw = fields.get(b"id") or fields.get("id")
                        if raw is not None:
                            self._notify(raw.decode() if isinstance(raw, bytes) else str(raw))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("following the escalation stream failed (%s); retrying", exc)
                await asyncio.sleep(1.0)

    async def _create_group(self) -> bool:
        from redis.exceptions import ResponseError

        from router.escalations.redis_store import RedisEscalationStore

        store = self.store
        assert isinstance(store, RedisEscalationStore)
        try:
            await store.client.xgroup_create(store.events_key, _GROUP, id="$", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                logger.warning("creating the webhook consumer group failed: %s", exc)
                return False
        except Exception as exc:
            logger.warning("creating the webhook consumer group failed: %s", exc)
            return False
        return True

    async def _deliver_from_group(self) -> None:
        """Deliver webhooks for new escalations, one process per escalation (consumer group)."""
        from router.escalations.redis_store import RedisEscalationStore

        store, webhook = self.store, self.webhook
        assert isinstance(store, RedisEscalationStore) and webhook is not None
        client = store.client
        consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        group_ready = True
        next_reclaim = 0.0

        async def handle(entry_id: Any, fields: dict[Any, Any]) -> None:
            def text(name: str) -> str:
                raw = fields.get(name.encode(), fields.get(name))
                return raw.decode() if isinstance(raw, bytes) else str(raw or "")

            async def ack() -> None:
                try:
                    await client.xack(store.events_key, _GROUP, entry_id)
                except Exception as exc:
                    logger.warning("acknowledging webhook entry failed: %s", exc)

            record = await self.get(text("id")) if text("status") == "pending" else None
            if record is None:
                await ack()
            else:
                webhook.notify(_summary(record), after=ack)

        while True:
            try:
                if not group_ready:
                    group_ready = await self._create_group()
                if time.monotonic() >= next_reclaim:
                    next_reclaim = time.monotonic() + 10
                    claimed: Any = await client.xautoclaim(
                        store.events_key, _GROUP, consumer, _RECLAIM_IDLE_MS, "0-0", count=50
                    )
                    for entry_id, fields in claimed[1]:
                        await handle(entry_id, fields)
                replies: Any = await client.xreadgroup(
                    _GROUP, consumer, {store.events_key: ">"}, count=50, block=1000
                )
                for _stream, entries in replies or ():
                    for entry_id, fields in entries:
                        await handle(entry_id, fields)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if "NOGROUP" in str(exc):
                    group_ready = False
                logger.warning("webhook consumer group read failed (%s); retrying", exc)
                await asyncio.sleep(1.0)


def _summary(record: Escalation) -> dict[str, Any]:
    view = record.reviewer_view()
    return {
        "event": "escalation.created",
        **{
            k: view[k]
            for k in ("id", "created", "model", "rule", "policy", "backend", "mode", "score")
        },
        "percentile": view["percentile"],
        "review_path": "/review#" + record.id,
    }
