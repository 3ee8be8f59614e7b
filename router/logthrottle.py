"""A log line that any client can trigger, at most once per interval, with a count.

``ThrottledLog(logger, "probe refused %d input(s) in the last %.0f s; last: %s", 60)`` logs the
first event at once, then at most one line per ``interval_s`` counting the events since the
previous line, so a client repeating a bad request cannot flood the log. Events are counted
even while no line is written; the count of the last quiet interval is written with the next
event after it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["ThrottledLog"]


class ThrottledLog:
    """One throttled message: ``format`` takes the count, the interval and ``detail``."""

    __slots__ = ("_clock", "_count", "_format", "_level", "_lock", "_logger", "_next", "interval_s")

    def __init__(
        self,
        logger: logging.Logger,
        format: str,
        interval_s: float = 60.0,
        *,
        level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._format = format
        self._level = level
        self._clock = clock
        self._lock = threading.Lock()
        self._count = 0
        self._next = float("-inf")
        self.interval_s = interval_s

    def event(self, detail: object) -> bool:
        """Count one event; log a line when the interval has passed. True when it logged."""
        with self._lock:
            self._count += 1
            now = self._clock()
            if now < self._next:
                return False
            count, self._count = self._count, 0
            self._next = now + self.interval_s
        self._logger.log(self._level, self._format, count, self.interval_s, detail)
        return True
