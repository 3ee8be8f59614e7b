"""The gateway's side of the probe: cache, single flight, worker thread, deadline, calibration.

``ProbeService.measure(item)`` never raises for a probe problem: it returns a ``ProbeOutcome``
with ``error`` set (input the probe cannot read, a model failure, the deadline passing), and the
policy sends the request to its ``on_probe_error`` backend. Concurrent identical requests share
one probe pass. The forward pass runs in a worker thread, off the event loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import anyio
import anyio.to_thread

from probes.calibration import Calibration
from probes.errors import ProbeError
from probes.probe import ProbeInput, ProbeResult, SparsityProbe
from router.remote_probe import RemoteProbeError

__all__ = ["CacheState", "ProbeOutcome", "ProbeService", "Prober"]

logger = logging.getLogger(__name__)

CacheState = Literal["hit", "miss", "off"]


class Prober(Protocol):
    """What the service needs of a probe: ``SparsityProbe`` or ``router.remote_probe``'s.

    A prober with an ``ameasure_one`` coroutine (the remote probe) is awaited on the event loop
    and may run many requests at once; otherwise ``measure_one`` runs in a worker thread, one
    pass at a time.
    """

    n_layers: int

    def fingerprint(self) -> dict[str, Any]: ...

    def measure_one(self, item: ProbeInput) -> ProbeResult: ...


@dataclass(frozen=True, slots=True)
class ProbeOutcome:
    result: ProbeResult | None
    cache: CacheState
    seconds: float
    error: str | None = None  # "timeout", "input", "model"


class _Flight:
    """One in-progress probe pass that identical requests wait on."""

    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.result: ProbeResult | None = None
        self.error: str | None = None


class ProbeService:
    def __init__(
        self,
        probe: SparsityProbe | Prober,
        *,
        calibration: Calibration | None,
        cache: Any | None,  # router.cache.ProbeCache
        timeout_s: float,
        on_measured: Callable[[ProbeOutcome], None] | None = None,
    ) -> None:
        self.probe = probe
        self.calibration = calibration
        self.cache = cache
        self.timeout_s = timeout_s
        self._on_measured = on_measured
        self._prefix = json.dumps(probe.fingerprint(), sort_keys=True).encode()
        self._limiter = anyio.CapacityLimiter(1)
        self._flights: dict[str, _Flight] = {}

    def key(self, item: ProbeInput) -> str:
        digest = hashlib.sha256(self._prefix)
        digest.update(json.dumps(item, sort_keys=True, ensure_ascii=False).encode())
        return digest.hexdigest()

    async def measure(self, item: ProbeInput) -> ProbeOutcome:
        start = time.perf_counter()
        key = self.key(item)
        if self.cache is not None:
            cached = await self.cache.get(key)
            if cached is not None:
                return self._done(ProbeOutcome(cached, "hit", time.perf_counter() - start))
        state: CacheState = "miss" if self.cache is not None else "off"
        flight = self._flights.get(key)
        if flight is not None:  # the same prompt is being probed right now: wait for it
            await flight.done.wait()
            return self._done(
                ProbeOutcome(flight.result, state, time.perf_counter() - start, flight.error)
            )
        flight = self._flights[key] = _Flight()
        try:
            flight.result, flight.error = await self._run(item)
            if flight.result is not None and self.cache is not None:
                await self.cache.set(key, flight.result)
        finally:
            flight.done.set()
            del self._flights[key]
        return self._done(
            ProbeOutcome(flight.result, state, time.perf_counter() - start, flight.error)
        )

    async def _run(self, item: ProbeInput) -> tuple[ProbeResult | None, str | None]:
        try:
            with anyio.fail_after(self.timeout_s):
                ameasure = getattr(self.probe, "ameasure_one", None)
                if ameasure is not None:
                    result = await ameasure(item)
                else:
                    result = await anyio.to_thread.run_sync(
                        self.probe.measure_one, item, limiter=self._limiter, abandon_on_cancel=True
                    )
        except TimeoutError:
            logger.warning("probe missed its %.2f s deadline", self.timeout_s)
            return None, "timeout"
        except RemoteProbeError as exc:  # server down, slow or mismatched: not the input's fault
            logger.warning("remote probe failed: %s", exc)
            return None, "model"
        except ProbeError as exc:
            logger.info("probe refused the input: %s", exc)
            return None, "input"
        except Exception:
            logger.exception("probe failed")
            return None, "model"
        if self.calibration is not None:
            result = self.calibration.with_percentile(result)
        return result, None

    async def aclose(self) -> None:
        """Close the probe's connections (the remote probe's HTTP client)."""
        aclose = getattr(self.probe, "aclose", None)
        if aclose is not None:
            await aclose()

    def _done(self, outcome: ProbeOutcome) -> ProbeOutcome:
        if self._on_measured is not None:
            self._on_measured(outcome)
        return outcome
