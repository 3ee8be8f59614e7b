"""When an upstream backend tries again: the retry policy, ``retry-after`` and jittered backoff.

A replica's failure before the first byte (a connect error, a timeout, or a status listed in
``retry_on``) is retried: on another replica at once when one is ready, else on the same one
after a wait. The wait is the upstream's ``retry-after`` (or ``retry-after-ms``) when it sent
one, up to ``retry_after_max_s`` (a replica asking for longer is not retried for that request:
the backend fails over instead of waiting), else an exponential backoff with full jitter:
uniform in ``[0, min(backoff_max_s, backoff_base_s * 2**n)]`` for the replica's n-th retry.
No wait runs past the backend's deadline (``timeouts.total_s``), nor past the request's own
(``server.request_timeout_s``) once the route has bound it with :func:`bind_request_limit`.

:class:`UpstreamObserver` is what a backend reports (retries, failed attempts, breaker states);
:class:`router.metrics.GatewayMetrics` implements it.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "DEFAULT_RETRY_ON",
    "RetryPolicy",
    "UpstreamObserver",
    "bind_request_limit",
    "parse_retry_after",
    "request_time_left",
    "retry_after_header",
]

#: The statuses retried unless a backend's ``retry_on`` says otherwise.
DEFAULT_RETRY_ON = frozenset({429, 500, 502, 503, 504})

_REQUEST_LIMIT: ContextVar[asyncio.Timeout | None] = ContextVar(
    "router_request_limit", default=None
)


def bind_request_limit(limit: asyncio.Timeout) -> None:
    """Make ``limit`` (the request's ``asyncio.timeout``, in the request's own task) the budget
    that waits between retries must fit in; a rescheduled limit is followed."""
    _REQUEST_LIMIT.set(limit)


def request_time_left() -> float | None:
    """Seconds left to the current request's bound limit; None when there is none."""
    limit = _REQUEST_LIMIT.get()
    when = limit.when() if limit is not None else None
    if when is None:
        return None
    return when - asyncio.get_running_loop().time()


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How one backend retries a failed attempt (see the module docstring)."""

    retry_on: frozenset[int] = DEFAULT_RETRY_ON
    retries: int = 2  # tries after every replica had one
    retry_after_max_s: float = 5.0
    backoff_base_s: float = 0.1
    backoff_max_s: float = 2.0

    def backoff(self, n: int, rand: Callable[[], float] = random.random) -> float:
        """The wait before a replica's ``n``-th retry (0 for the first): full jitter."""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2.0 ** min(n, 60))
        return ceiling * rand()


def parse_retry_after(
    headers: Mapping[str, str], now: Callable[[], float] = time.time
) -> float | None:
    """Seconds an upstream asks to wait: ``retry-after-ms``, else ``retry-after`` (seconds or an
    HTTP date); None when neither is there or readable. A date in the past reads as 0."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return value
    raw = headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # an HTTP date is GMT
            return None
        return max(0.0, when.timestamp() - now())
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def retry_after_header(seconds: float | None) -> dict[str, str]:
    """``{"retry-after": whole seconds, at least 1}`` for an error answer; {} for None."""
    if seconds is None:
        return {}
    return {"retry-after": str(max(1, math.ceil(seconds)))}


class UpstreamObserver(Protocol):
    """What an upstream backend reports, for metrics."""

    def record_retry(self, backend: str, reason: str) -> None:
        """An attempt that follows a failed one; ``reason``: the failure (a status, connect,
        timeout, error)."""
        ...

    def record_upstream_failure(self, backend: str, reason: str) -> None:
        """One failed attempt on a replica, retried or not."""
        ...

    def record_breaker(self, backend: str, replica: str, state: str) -> None:
        """A replica's breaker is now ``state``: closed, half_open or open."""
        ...
