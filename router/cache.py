"""Probe-result caches. ``MemoryCache``: an LRU with a TTL, for one process."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Protocol

from probes.probe import ProbeResult

__all__ = ["MemoryCache", "ProbeCache"]


class ProbeCache(Protocol):
    async def get(self, key: str) -> ProbeResult | None: ...

    async def set(self, key: str, value: ProbeResult) -> None: ...


class MemoryCache:
    """Least-recently-used cache of probe results, entries expiring after ``ttl_s``."""

    def __init__(self, max_entries: int = 10_000, ttl_s: float = 3600.0) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._data: OrderedDict[str, tuple[float, ProbeResult]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    async def get(self, key: str) -> ProbeResult | None:
        item = self._data.get(key)
        if item is None:
            return None
        expires, value = item
        if expires < time.monotonic():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    async def set(self, key: str, value: ProbeResult) -> None:
        self._data[key] = (time.monotonic() + self.ttl_s, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)
