"""Send a decided request down its backend chain: the chosen backend, then its fallbacks."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from router.backends.base import Backend, Endpoint, UpstreamResult
from router.errors import NoBackendAvailable, UpstreamError, UpstreamStatus, UpstreamTimeout

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

    Connection errors, timeouts and 5xx before the first byte move on; an upstream 4xx is the
    client's answer and is raised as is. When every backend fails: NoBackendAvailable (503), or
    UpstreamTimeout (504) when the last failure was a timeout.
    """
    failed: list[str] = []
    reasons: list[str] = []
    last: UpstreamError | None = None
    for name in chain:
        try:
            result = await backends[name].send(endpoint, body, stream=stream)
        except UpstreamStatus:
            raise
        except UpstreamError as exc:
            failed.append(name)
            reasons.append(exc.message)
            last = exc
            logger.warning("backend %s failed, %d left in chain", name, len(chain) - len(failed))
            continue
        return Dispatched(result, name, tuple(failed))
    message = "no backend could answer: " + "; ".join(reasons)
    if isinstance(last, UpstreamTimeout):
        raise UpstreamTimeout(message)
    raise NoBackendAvailable(message)
