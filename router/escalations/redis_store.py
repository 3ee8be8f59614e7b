"""Redis escalation store: one queue shared by several gateway processes.

Keys (under ``prefix``)::

    e:<id>   a hash per escalation (status, times, request data, claim, answer)
    open     a sorted set of open (pending/claimed) ids by creation time
    all      a sorted set of every id by creation time
    events   a stream, the event log: one entry per creation and transition
             (``XREAD`` wakes waiting requests in every process; reviewers' tools may tail it)

Every transition is one Lua script (:data:`_TRANSITION`), atomic in Redis, applying the same
rules as :func:`router.escalations.model.decide`: of concurrent answers from any number of
processes exactly one applies.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import redis.asyncio as redis

from router.escalations.model import (
    Escalation,
    NewEscalation,
    Op,
    StoreConflict,
    StoreMissing,
)

__all__ = ["RedisEscalationStore"]

_STREAM_MAXLEN = 100_000

# KEYS: hash, open, events. ARGV: op, who, text, now, lease_until, id, maxlen.
_TRANSITION = """
local h = KEYS[1]
if redis.call('EXISTS', h) == 0 then return {'missing', ''} end
local op, who, text, now = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local f = redis.call('HMGET', h, 'status', 'claimed_by', 'lease_until', 'answered_by',
                     'answer', 'reason')
local status, claimed_by = f[1], f[2] or ''
local lease = tonumber(f[3] or '') or 0
if status == 'claimed' and lease <= now then status = 'pending'; claimed_by = '' end
if op == 'answer' or op == 'reject' then
  local target = (op == 'answer') and 'answered' or 'rejected'
  local prev = (op == 'answer') and f[5] or f[6]
  if status == target and f[4] == who and prev == text then return {'same', status} end
end
if status == 'answered' or status == 'rejected' or status == 'expired' then
  return {'conflict', status, 'escalation is already ' .. status}
end
if op ~= 'expire' and status == 'claimed' and claimed_by ~= who then
  return {'conflict', status, 'escalation is claimed by ' .. claimed_by ..
          ' until its lease ends'}
end
local new
if op == 'claim' then
  new = 'claimed'
  redis.call('HSET', h, 'status', new, 'updated', ARGV[4], 'claimed_by', who,
             'lease_until', ARGV[5])
elseif op == 'answer' then
  new = 'answered'
  redis.call('HSET', h, 'status', new, 'updated', ARGV[4], 'answer', text,
             'answered_by', who, 'lease_until', '')
else
  new = (op == 'reject') and 'rejected' or 'expired'
  redis.call('HSET', h, 'status', new, 'updated', ARGV[4], 'reason', text,
             'answered_by', who, 'lease_until', '')
end
if new ~= 'claimed' then redis.call('ZREM', KEYS[2], ARGV[6]) end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '*', 'id', ARGV[6], 'status', new)
return {'ok', new}
"""


def _s(value: Any) -> str | None:
    if value is None:
        return None
    text = value.decode() if isinstance(value, bytes) else str(value)
    return text or None


def _f(value: Any) -> float | None:
    text = _s(value)
    return None if text is None else float(text)


class RedisEscalationStore:
    kind = "redis"

    def __init__(self, url: str, *, prefix: str = "sparsity-router:escalations:") -> None:
        self._redis: redis.Redis = redis.Redis.from_url(url, socket_timeout=5)
        self.prefix = prefix
        self.events_key = prefix + "events"
        self._open = prefix + "open"
        self._all = prefix + "all"
        self._script = self._redis.register_script(_TRANSITION)

    @property
    def client(self) -> redis.Redis:
        return self._redis

    def _key(self, id: str) -> str:
        return f"{self.prefix}e:{id}"

    def _record(self, id: str, h: dict[Any, Any], now: float) -> Escalation:
        g = {(k.decode() if isinstance(k, bytes) else k): v for k, v in h.items()}
        return Escalation.from_parts(
            id=id,
            status=_s(g.get("status")) or "pending",
            created=_f(g.get("created")) or 0.0,
            updated=_f(g.get("updated")) or 0.0,
            data=_s(g.get("data")) or "{}",
            owner=_s(g.get("owner")),
            claimed_by=_s(g.get("claimed_by")),
            lease_until=_f(g.get("lease_until")),
            answer=_s(g.get("answer")),
            answered_by=_s(g.get("answered_by")),
            reason=_s(g.get("reason")),
            now=now,
        )

    async def create(self, new: NewEscalation, now: float) -> Escalation:
        mapping: Any = {
            "status": "pending",
            "created": repr(now),
            "updated": repr(now),
            "data": new.data_json(),
            "owner": new.owner or "",
        }
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key(new.id), mapping=mapping)
            pipe.zadd(self._open, {new.id: now})
            pipe.zadd(self._all, {new.id: now})
            pipe.xadd(
                self.events_key,
                {"id": new.id, "status": "pending"},
                maxlen=_STREAM_MAXLEN,
                approximate=True,
            )
            await pipe.execute()
        found = await self.get(new.id, now)
        assert found is not None
        return found

    async def get(self, id: str, now: float) -> Escalation | None:
        h = await self._redis.hgetall(self._key(id))
        return self._record(id, h, now) if h else None

    async def query(
        self, statuses: Iterable[str], now: float, limit: int = 200
    ) -> list[Escalation]:
        wanted = set(statuses)
        if not wanted:
            return []
        source = self._open if wanted <= {"pending", "claimed"} else self._all
        ids = [_s(i) or "" for i in await self._redis.zrange(source, 0, -1)]
        out: list[Escalation] = []
        for start in range(0, len(ids), 200):
            chunk = ids[start : start + 200]
            async with self._redis.pipeline(transaction=False) as pipe:
                for id in chunk:
                    pipe.hgetall(self._key(id))
                hashes = await pipe.execute()
            for id, h in zip(chunk, hashes, strict=True):
                if h:
                    record = self._record(id, h, now)
                    if record.status in wanted:
                        out.append(record)
                        if len(out) >= limit:
                            return out
        return out

    async def transition(
        self, id: str, op: Op, who: str, text: str, now: float, lease_until: float | None = None
    ) -> Escalation:
        result = cast(
            list[Any],
            await self._script(
                keys=[self._key(id), self._open, self.events_key],
                args=[
                    op,
                    who,
                    text,
                    repr(now),
                    repr(lease_until) if lease_until is not None else "",
                    id,
                    _STREAM_MAXLEN,
                ],
            ),
        )
        verdict = _s(result[0])
        if verdict == "missing":
            raise StoreMissing(id)
        if verdict == "conflict":
            status = _s(result[1]) or ""
            raise StoreConflict(f"{id}: {_s(result[2])}", status)
        found = await self.get(id, now)
        if found is None:  # pragma: no cover - deleted behind our back
            raise StoreMissing(id)
        return found

    async def due_for_expiry(self, before: float, now: float) -> list[str]:
        ids = await self._redis.zrangebyscore(self._open, "-inf", f"({before!r}")
        return [_s(i) or "" for i in ids]

    async def purge(self, before: float, now: float) -> int:
        old = [
            _s(i) or "" for i in await self._redis.zrangebyscore(self._all, "-inf", f"({before!r}")
        ]
        if not old:
            return 0
        async with self._redis.pipeline(transaction=False) as pipe:
            for id in old:
                pipe.zscore(self._open, id)
            still_open = await pipe.execute()
        closed = [id for id, score in zip(old, still_open, strict=True) if score is None]
        if closed:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(*[self._key(id) for id in closed])
                pipe.zrem(self._all, *closed)
                await pipe.execute()
        return len(closed)

    async def count_open(self, now: float) -> int:
        return int(await self._redis.zcard(self._open))

    async def aclose(self) -> None:
        await self._redis.aclose()
