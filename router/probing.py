"""The gateway's side of the probe: cache, single flight, worker thread, deadline, calibration.

``ProbeService.measure(item)`` never raises for a probe problem: it returns a ``ProbeOutcome``
with ``error`` set (input the probe cannot read, a model failure, the deadline passing), and the
policy sends the request to its ``on_probe_error`` backend. Concurrent identical requests share
one cache lookup and one probe pass (single flight): the first is a ``hit`` or ``miss``, the ones
that waited for it are ``shared``. Caches hold the raw result; the calibration's percentile is
added on the way out, so gateways with different calibrations can share one Redis, and a
request applies the calibration its gateway state held when it began (a reload swaps the state,
never the calibration under a request that is running).

Under load (the local probe):

- the input is tokenised in a helper thread, off the event loop and off the probe's thread,
  with its cost bounded before the chat template (``max_messages``, ``max_chars``);
- forward passes run one at a time on a dedicated worker thread (``MicroBatcher``); distinct
  requests arriving together share a pass (``BatchingConfig.max_batch``, ``window_s``);
- inputs over ``long_tokens`` queue apart from shorter ones and the worker takes turns between
  the two queues; a pass holds at most ``max_batch_tokens`` padded tokens: a short prompt waits
  for at most one bounded pass of long ones;
- a request whose deadline passed in the queue is not run, and a pass whose callers have all
  gone (deadline, disconnect) stops at the next layer.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import anyio

from probes.batching import MicroBatcher
from probes.calibration import Calibration
from probes.errors import ProbeError
from probes.probe import ProbeAbandoned, SparsityProbe
from probes.types import ProbeInput, ProbeResult
from router.logthrottle import ThrottledLog
from router.remote_probe import RemoteProbeError

__all__ = ["BatchingConfig", "CacheState", "ProbeOutcome", "ProbeService", "Prober"]

logger = logging.getLogger(__name__)

#: Where a result came from: ``hit`` (the cache), ``miss`` (a probe pass, the result then
#: cached), ``shared`` (waited for an identical request's lookup or pass: single flight),
#: ``off`` (no cache configured; a pass).
CacheState = Literal["hit", "miss", "shared", "off"]


class Prober(Protocol):
    """What the service needs of a probe: ``SparsityProbe`` or ``router.remote_probe``'s.

    A prober with an ``ameasure_one`` coroutine (the remote probe) is awaited on the event loop
    and may run many requests at once; otherwise ``measure_one`` runs in a worker thread, one
    pass at a time.
    """

    n_layers: int

    def fingerprint(self) -> dict[str, Any]: ...

    def measure_one(self, item: ProbeInput) -> ProbeResult: ...


class _Default(enum.Enum):
    """``ProbeService.measure``'s calibration when none is given: the service's own."""

    SERVICE = enum.auto()


@dataclass(frozen=True, slots=True)
class ProbeOutcome:
    """A probe result as the gateway saw it: where it came from and how long it took."""

    result: ProbeResult | None
    cache: CacheState
    seconds: float
    error: str | None = None  # "timeout", "input", "model", "cancelled" (the shared pass's owner)


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    """How the probe's worker thread schedules forward passes (``probe.batching``).

    ``max_batch`` requests per pass, collected for ``window_s`` while the worker is idle;
    inputs of more than ``long_tokens`` tokens queue apart from shorter ones (None: one queue);
    a pass holds at most ``max_batch_tokens`` padded tokens (None: no bound)."""

    max_batch: int = 16
    window_s: float = 0.005
    long_tokens: int | None = 128
    max_batch_tokens: int | None = 512


@dataclass(slots=True)
class _Job:
    """One request's probe input in the batcher, and whether anyone still waits for it."""

    item: ProbeInput
    encoded: tuple[list[int], bool] | None  # (token ids, cut) for the local probe
    deadline: float  # time.monotonic() seconds
    gone: bool = field(default=False)  # its caller stopped waiting


def _all_gone(jobs: Sequence[_Job]) -> bool:
    """Whether nobody waits for any of ``jobs`` any more (their pass may stop)."""
    now = time.monotonic()
    return all(job.gone or job.deadline <= now for job in jobs)


class _Flight:
    """One in-progress cache lookup and probe pass that identical requests wait on."""

    __slots__ = ("cache", "done", "error", "result")

    def __init__(self, cache: CacheState) -> None:
        self.done = anyio.Event()
        self.result: ProbeResult | None = None
        self.error: str | None = None
        self.cache: CacheState = cache


class ProbeService:
    """Probe results for the gateway: cache, single flight, deadline, batching, calibration."""

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
        self.batcher: MicroBatcher[_Job, ProbeResult] = MicroBatcher(
            self._measure_batch,
            max_batch=config.max_batch,
            window_s=config.window_s,
            thread_name="probe",
            long_cost=config.long_tokens,
            max_batch_cost=config.max_batch_tokens,
        )
        self.passes = 0  # forward passes run (one per batch)
        self.abandoned = 0  # passes stopped early: every caller had gone
        self.refused = ThrottledLog(  # inputs the probe cannot read: at most a line a minute
            logger, "the probe refused %d input(s) in the last %.0f s; last: %s"
        )
        self.late = ThrottledLog(  # an overload makes every request late: one line a minute
            logger, "the probe missed its deadline %d time(s) in the last %.0f s (%s s)"
        )

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
        self, item: ProbeInput, *, calibration: Calibration | _Default | None = _Default.SERVICE
    ) -> ProbeOutcome:
        """The probe result for ``item``, with ``calibration`` (default: the service's; None:
        none) applied.

        The cache holds raw results, so one probe serves several calibrations (a policy's
        cascade reads prompt-plus-answer inputs with its answer calibration; the routes pass the
        calibration of the gateway state they read once per request)."""
        start = time.perf_counter()
        if calibration is _Default.SERVICE:
            calibration = self.calibration
        key = self.key(item)
        flight = self._flights.get(key)
        if flight is not None:  # the same prompt is being looked up or probed: wait for it
            await flight.done.wait()
            return await self._finish(flight.result, "shared", start, flight.error, calibration)
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

    def _measure_batch(self, jobs: Sequence[_Job]) -> list[ProbeResult | BaseException]:
        """One forward pass over ``jobs`` (worker thread), stopped at the next layer once all
        their callers have gone. An input the probe cannot read fails alone: the batch is then
        measured item by item."""
        self.passes += 1
        encoded = [job.encoded for job in jobs if job.encoded is not None]
        if isinstance(self.probe, SparsityProbe) and len(encoded) == len(jobs):
            try:
                return list(self.probe.measure_encoded(encoded, stop=lambda: _all_gone(jobs)))
            except ProbeAbandoned:
                self.abandoned += 1
                return [TimeoutError("every caller of the pass had gone") for _ in jobs]
            except ProbeError as exc:
                if len(jobs) == 1:  # its caller's error, not a failed batch (no warning)
                    return [exc]
        out: list[ProbeResult | BaseException] = []
        for job in jobs:
            try:
                out.append(self.probe.measure_one(job.item))
            except Exception as exc:
                out.append(exc)
        return out

    async def _submit(self, item: ProbeInput, deadline: float) -> ProbeResult:
        """Queue ``item`` for the worker thread; the local probe's input is tokenised first, in
        a helper thread (bounded by max_messages/max_chars), so the batcher knows its length."""
        encoded: tuple[list[int], bool] | None = None
        if isinstance(self.probe, SparsityProbe):
            encoded = await anyio.to_thread.run_sync(
                self.probe.encode, item, abandon_on_cancel=True
            )
        job = _Job(item, encoded, deadline)
        cost = len(encoded[0]) if encoded is not None else 1
        try:
            return await self.batcher.submit(job, cost=cost, deadline=deadline)
        finally:
            job.gone = True  # answered, timed out or cancelled: its pass need not go on for it

    async def _run(self, item: ProbeInput) -> tuple[ProbeResult | None, str | None]:
        try:
            with anyio.fail_after(self.timeout_s):
                ameasure = getattr(self.probe, "ameasure_one", None)
                if ameasure is not None:
                    result = await ameasure(item)
                else:
                    result = await self._submit(item, time.monotonic() + self.timeout_s)
        except TimeoutError:
            self.late.event(f"{self.timeout_s:.2f}")
            return None, "timeout"
        except RemoteProbeError as exc:  # server down, slow or mismatched: not the input's fault
            logger.warning("remote probe failed: %s", exc)
            return None, "model"
        except ProbeError as exc:  # any client can send these: one log line a minute at most
            self.refused.event(exc)
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
                    await self._submit(item, time.monotonic() + timeout_s)
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
