"""The gateway's side of the probe: cache, single flight, worker thread, deadline, calibration.

``ProbeService.measure(item)`` never raises for a probe problem: it returns a ``ProbeOutcome``
with ``error`` set (input the probe cannot read, a model failure, the deadline passing), and the
policy sends the request to its ``on_probe_error`` backend. Concurrent identical requests share
one cache lookup and one probe pass (single flight). The forward pass runs in a worker thread,
off the event loop; with a ``MicroBatcher`` configured, distinct requests arriving together share
one forward pass. Caches hold the raw result; the calibration's percentile is added on the way
out, so gateways with different calibrations can share one Redis.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import anyio

from probes.batching import MicroBatcher
from probes.calibration import Calibration
from probes.errors import ProbeError
from probes.probe import ProbeInput, ProbeResult, SparsityProbe
from router.remote_probe import RemoteProbeError

__all__ = ["BatchingConfig", "CacheState", "ProbeOutcome", "ProbeService", "Prober"]

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
    error: str | None = None  # "timeout", "input", "model", "cancelled" (the shared pass's owner)


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    max_batch: int = 16
    window_s: float = 0.005


class _Flight:
    """One in-progress cache lookup and probe pass that identical requests wait on."""

    __slots__ = ("cache", "done", "error", "result")

    def __init__(self, cache: CacheState) -> None:
        self.done = anyio.Event()
        self.result: ProbeResult | None = None
        self.error: str | None = None
        self.cache: CacheState = cache


class ProbeService:
    def __init__(
        self,
        probe: SparsityProbe | Prober,
        *,
        calibration: Calibration | None,
        cache: Any | None,  # router.cache.ProbeCache
        timeout_s: float,
        on_measured: Callable[[ProbeOutcome], None] | None = None,
        batching: BatchingConfig | None = None,
    ) -> None:
        self.probe = probe
        self.calibration = calibration
        self.cache = cache
        self.timeout_s = timeout_s
        self._on_measured = on_measured
        self._prefix = json.dumps(
            {**probe.fingerprint(), "reports": _reports(probe)}, sort_keys=True
        ).encode()
        self._flights: dict[str, _Flight] = {}
        # Batching off is a batch of one, still on one dedicated worker thread: forward passes
        # from changing threads each start their own OpenMP team, and idle teams spinning
        # beside the busy one cut throughput several-fold (bench/probe_throughput.py).
        self.batching = batching
        config = batching or BatchingConfig(max_batch=1, window_s=0.0)
        self.batcher: MicroBatcher[ProbeInput, ProbeResult] = MicroBatcher(
            self._measure_batch,
            max_batch=config.max_batch,
            window_s=config.window_s,
            thread_name="probe",
        )
        self.passes = 0  # forward passes run (one per batch)

    @property
    def fingerprint_digest(self) -> str:
        """A short digest of the probe's fingerprint and of what its results report (stored
        with cached values)."""
        return hashlib.sha256(self._prefix).hexdigest()[:16]

    def key(self, item: ProbeInput) -> str:
        digest = hashlib.sha256(self._prefix)
        digest.update(json.dumps(item, sort_keys=True, ensure_ascii=False).encode())
        return digest.hexdigest()

    async def measure(
        self, item: ProbeInput, *, calibration: Calibration | None = None
    ) -> ProbeOutcome:
        """The probe result for ``item``, with ``calibration`` (default: the service's) applied.

        The cache holds raw results, so one probe serves several calibrations (a policy's
        cascade reads prompt-plus-answer inputs with its answer calibration)."""
        start = time.perf_counter()
        calibration = calibration or self.calibration
        key = self.key(item)
        flight = self._flights.get(key)
        if flight is not None:  # the same prompt is being looked up or probed: wait for it
            await flight.done.wait()
            return await self._finish(flight.result, flight.cache, start, flight.error, calibration)
        flight = self._flights[key] = _Flight("miss" if self.cache is not None else "off")
        try:
            if self.cache is not None:
                flight.result = await self.cache.get(key)
                if flight.result is not None:
                    flight.cache = "hit"
            if flight.result is None:
                flight.result, flight.error = await self._run(item)
                if flight.result is not None and self.cache is not None:
                    await self.cache.set(key, flight.result)
        finally:
            if flight.result is None and flight.error is None:  # its owner was cancelled
                flight.error = "cancelled"
            flight.done.set()
            del self._flights[key]
        return await self._finish(flight.result, flight.cache, start, flight.error, calibration)

    async def _finish(
        self,
        result: ProbeResult | None,
        cache: CacheState,
        start: float,
        error: str | None,
        calibration: Calibration | None,
    ) -> ProbeOutcome:
        if result is not None and calibration is not None:
            supervised = calibration.supervised
            if supervised is not None and supervised.neighbours:
                # ~1 ms of numpy per vote: keep the event loop free
                result = await anyio.to_thread.run_sync(calibration.with_percentile, result)
            else:
                result = calibration.with_percentile(result)
        return self._done(ProbeOutcome(result, cache, time.perf_counter() - start, error))

    def _measure_batch(self, items: Sequence[ProbeInput]) -> list[ProbeResult | BaseException]:
        """One forward pass over ``items`` (worker thread). An input the probe cannot read
        fails alone: the batch is then measured item by item."""
        self.passes += 1
        if isinstance(self.probe, SparsityProbe):
            try:
                return list(self.probe.measure(items, batch_size=len(items)))
            except ProbeError:
                if len(items) == 1:
                    raise
        out: list[ProbeResult | BaseException] = []
        for item in items:
            try:
                out.append(self.probe.measure_one(item))
            except Exception as exc:
                out.append(exc)
        return out

    async def _run(self, item: ProbeInput) -> tuple[ProbeResult | None, str | None]:
        try:
            with anyio.fail_after(self.timeout_s):
                ameasure = getattr(self.probe, "ameasure_one", None)
                if ameasure is not None:
                    result = await ameasure(item)
                else:
                    result = await self.batcher.submit(item)
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
        return result, None

    async def warm_up(self, timeout_s: float = 60.0) -> float | None:
        """Run one uncached pass so the first request does not pay the probe thread's start-up
        (its OpenMP team, lazy kernels: seconds on a loaded CPU, past ``timeout_s`` of a
        request). Returns the seconds it took, or None when it failed (logged, never raised:
        requests then go to ``on_probe_error`` as usual)."""
        start = time.perf_counter()
        item: ProbeInput = [{"role": "user", "content": "Hello, how are you today?"}]
        try:
            with anyio.fail_after(timeout_s):
                ameasure = getattr(self.probe, "ameasure_one", None)
                if ameasure is not None:
                    await ameasure(item)
                else:
                    await self.batcher.submit(item)
        except Exception as exc:
            logger.warning("probe warm-up failed (%s): %s", type(exc).__name__, exc)
            return None
        return time.perf_counter() - start

    async def aclose(self) -> None:
        """Close the probe's connections (the remote probe's HTTP client)."""
        aclose = getattr(self.probe, "aclose", None)
        if aclose is not None:
            await aclose()
        await self.batcher.aclose()
        if self.cache is not None:
            await self.cache.aclose()

    def _done(self, outcome: ProbeOutcome) -> ProbeOutcome:
        if self._on_measured is not None:
            self._on_measured(outcome)
        return outcome


def _reports(probe: Any) -> dict[str, Any]:
    """What a probe's results carry beyond the fingerprint (layers, metrics, token means, hidden
    vectors): part of the cache key, so a result cached by a probe that reported less is never
    served to a supervised model that reads more."""
    settings = getattr(probe, "settings", None)
    return {
        "layers": list(getattr(probe, "layers", ())),
        "metrics": list(getattr(settings, "metrics", ())),
        "token_mean": bool(getattr(probe, "token_mean", False)),
        "state_layers": list(getattr(probe, "state_layers", ())),
    }
