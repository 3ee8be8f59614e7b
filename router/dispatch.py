"""Send a decided request down its backend chain: the chosen backend, then its fallbacks.

Each backend retries its own replicas (:mod:`router.backends.openai`, :mod:`router.retry`); the
dispatcher moves to the next backend when one gives up, or at once when every replica of one is
skipped by its circuit breaker. When every backend tried was rate limited the client gets a 429
(``rate_limit_error``) with the shortest ``retry-after`` an upstream asked for, rather than a
503. A skipped backend does not decide the status.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from router.backends.base import Backend, Endpoint, UpstreamResult
from router.errors import (
    CircuitOpen,
    NoBackendAvailable,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamStatus,
    UpstreamTimeout,
)
from router.retry import retry_after_header

__all__ = ["Dispatched", "dispatch"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Dispatched:
    result: UpstreamResult
    backend: str  # the backend that answered
    fallback_from: tuple[str, ...]  # backends that failed before it, in order


async def dispatch(
    backends: Mapping[str, Backend],
    chain: tuple[str, ...],
    endpoint: Endpoint,
    body: dict[str, Any],
    *,
    stream: bool,
) -> Dispatched:
    """Try each backend of ``chain`` until one commits an answer.

    A backend that gives up (connection errors, timeouts, statuses of its ``retry_on`` on every
    try, every replica's breaker open) moves on; an upstream status outside ``retry_on`` is the
    client's answer and is raised as is. When every backend fails, judged by those that were
    tried (not skipped by their breakers): UpstreamRateLimited (429) when each was rate limited,
    UpstreamTimeout (504) when the last failure was a timeout, else NoBackendAvailable (503,
    with ``retry-after`` when every backend was skipped).
    """
    failed: list[str] = []
    reasons: list[str] = []
    last: UpstreamError | None = None  # the last failure of a backend that was tried
    throttled = True  # every backend tried so far answered 429 on every try
    throttled_until: list[float] = []  # when each backend's retry-after ends
    trial_in: list[float] = []  # skipped backends: seconds until a breaker lets a trial in
    for name in chain:
        try:
            result = await backends[name].send(endpoint, body, stream=stream)
        except UpstreamStatus:
            raise
        except UpstreamError as exc:
            failed.append(name)
            reasons.append(exc.message)
            logger.warning("backend %s failed, %d left in chain", name, len(chain) - len(failed))
            if isinstance(exc, CircuitOpen):
                if exc.retry_after is not None:
                    trial_in.append(exc.retry_after)
                continue
            last = exc
            if not isinstance(exc, UpstreamRateLimited):
                throttled = False
            elif exc.retry_after is not None:
                throttled_until.append(time.monotonic() + exc.retry_after)
            continue
        return Dispatched(result, name, tuple(failed))
    message = "no backend could answer: " + "; ".join(reasons)
    if last is None:  # every backend was skipped (or the chain is empty)
        raise NoBackendAvailable(
            message, headers=retry_after_header(min(trial_in)) if trial_in else None
        )
    if throttled:
        retry_after = None
        if throttled_until:
            retry_after = max(0.0, min(throttled_until) - time.monotonic())
        raise UpstreamRateLimited(message, retry_after=retry_after)
    if isinstance(last, UpstreamTimeout):
        raise UpstreamTimeout(message)
    raise NoBackendAvailable(message)
