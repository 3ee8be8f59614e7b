"""An asyncio micro-batcher: requests arriving within ``window_s`` (or until ``max_batch`` are
waiting) share one call of a batch function, run in a dedicated worker thread.

``await batcher.submit(item)`` returns that item's result. The batch function takes a list of
items and returns one entry per item, in order: a result, or an exception for that item alone.
If the batch function raises, every request of that batch (and no other) gets the exception.
A caller that stops waiting (a deadline, a disconnect) is dropped from a batch not yet started;
so is one whose ``deadline`` (``time.monotonic()`` seconds) has passed while it queued (it gets
``TimeoutError``). A batch already running finishes and its result for that caller is thrown
away (the batch function may stop early by itself: ``router.probing`` does).

While the worker is busy, new requests keep collecting; when it frees up, the next batch starts
at once with up to ``max_batch`` of them (no extra window), so under load batches fill up.

Costs and lanes: each request carries a ``cost`` (the probe passes its token count). With
``long_cost`` set, requests costing more queue in a second lane; when both lanes wait, the
worker alternates between them, so a cheap request waits for at most one batch of expensive
ones, and expensive ones are never starved. With ``max_batch_cost`` set, a batch holds at most
that padded cost (rows x the costliest row; a single costlier request still runs, alone), which
bounds how long one batch holds the worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["BatchFunction", "MicroBatcher"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

BatchFunction = Callable[[Sequence[T]], Sequence[R | BaseException]]

_SHORT, _LONG = 0, 1


@dataclass(slots=True)
class _Entry(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    cost: int
    deadline: float | None  # time.monotonic() seconds


class MicroBatcher(Generic[T, R]):
    """Collects ``submit``-ted items into batches run one at a time in a worker thread."""

    def __init__(
        self,
        run_batch: BatchFunction[T, R],
        *,
        max_batch: int = 16,
        window_s: float = 0.005,
        thread_name: str = "micro-batch",
        long_cost: int | None = None,
        max_batch_cost: int | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if window_s < 0:
            raise ValueError("window_s must not be negative")
        if long_cost is not None and long_cost < 1:
            raise ValueError("long_cost must be at least 1 (or None: one lane)")
        if max_batch_cost is not None and max_batch_cost < 1:
            raise ValueError("max_batch_cost must be at least 1 (or None: no bound)")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.window_s = window_s
        self.long_cost = long_cost
        self.max_batch_cost = max_batch_cost
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._lanes: tuple[list[_Entry[T, R]], list[_Entry[T, R]]] = ([], [])
        self._last_lane = _LONG  # when both lanes wait at the start, the short one goes first
        self._timer: asyncio.TimerHandle | None = None
        self._busy = False
        self._closed = False
        self.batches = 0  # batch function calls so far
        self.largest = 0  # the largest batch so far
        self.lane_batches = [0, 0]  # batches of short and of long requests
        self.expired = 0  # requests dropped unrun because their deadline passed in the queue

    async def submit(self, item: T, *, cost: int = 1, deadline: float | None = None) -> R:
        """``item``'s result from the batch function. ``cost``: what it adds to a batch (the
        probe: its tokens); ``deadline``: ``time.monotonic()`` past which it is not started."""
        if self._closed:
            raise RuntimeError("the micro-batcher is closed")
        if deadline is not None and deadline <= time.monotonic():
            raise TimeoutError("the deadline passed before the request was queued")
        loop = asyncio.get_running_loop()
        entry: _Entry[T, R] = _Entry(item, loop.create_future(), max(1, cost), deadline)
        lane = self._lanes[self._lane_of(entry.cost)]
        lane.append(entry)
        if not self._busy:
            if self.window_s == 0 or self._fit(lane) < len(lane) or len(lane) >= self.max_batch:
                self._start(loop)  # nothing more could join this lane's next batch
            elif self._timer is None:
                self._timer = loop.call_later(self.window_s, self._start, loop)
        return await entry.future

    @property
    def pending(self) -> int:
        """Requests queued (not yet in a batch)."""
        return sum(len(lane) for lane in self._lanes)

    def _lane_of(self, cost: int) -> int:
        return _LONG if self.long_cost is not None and cost > self.long_cost else _SHORT

    def _fit(self, lane: list[_Entry[T, R]]) -> int:
        """How many requests from the head of ``lane`` the next batch takes (at least one)."""
        n, widest = 0, 0
        for entry in lane[: self.max_batch]:
            widest = max(widest, entry.cost)
            if n and self.max_batch_cost is not None and (n + 1) * widest > self.max_batch_cost:
                break
            n += 1
        return max(n, 1)

    def _prune(self) -> None:
        """Drop requests whose caller left, and fail those whose deadline passed."""
        now = time.monotonic()
        for lane in self._lanes:
            kept = []
            for entry in lane:
                if entry.future.done():
                    continue
                if entry.deadline is not None and entry.deadline <= now:
                    self.expired += 1
                    entry.future.set_exception(TimeoutError("the deadline passed in the queue"))
                    entry.future.exception()  # retrieved here: its caller may be cancelled too
                    continue
                kept.append(entry)
            lane[:] = kept

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._busy or self._closed:
            return
        self._prune()
        waiting = [i for i, lane in enumerate(self._lanes) if lane]
        if not waiting:
            return
        # both lanes waiting: take turns, so neither waits for more than one of the other's
        index = waiting[0] if len(waiting) == 1 else 1 - self._last_lane
        self._last_lane = index
        lane = self._lanes[index]
        n = self._fit(lane)
        batch = lane[:n]
        del lane[:n]
        self._busy = True
        self.batches += 1
        self.lane_batches[index] += 1
        self.largest = max(self.largest, len(batch))
        items = [e.item for e in batch]
        done = loop.run_in_executor(self._executor, self._call, items)
        done.add_done_callback(lambda f: self._finish(loop, batch, f))

    def _call(self, items: list[T]) -> Sequence[R | BaseException]:
        results = self.run_batch(items)
        if len(results) != len(items):
            raise RuntimeError(f"batch function returned {len(results)} results for {len(items)}")
        return results

    def _finish(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[_Entry[T, R]],
        done: asyncio.Future[Sequence[R | BaseException]],
    ) -> None:
        self._busy = False
        if done.cancelled():
            error: BaseException | None = RuntimeError("the batch was cancelled")
            results: Sequence[R | BaseException] = ()
        else:
            error = done.exception()
            results = () if error is not None else done.result()
        if error is not None:
            logger.warning("a probe batch of %d failed: %r", len(batch), error)
        for i, entry in enumerate(batch):
            if entry.future.done():  # its caller gave up
                continue
            outcome = error if error is not None else results[i]
            if isinstance(outcome, BaseException):
                entry.future.set_exception(outcome)
            else:
                entry.future.set_result(outcome)
        if self.pending:  # what arrived while the worker was busy goes next, at once
            self._start(loop)

    async def aclose(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for lane in self._lanes:
            for entry in lane:
                if not entry.future.done():
                    entry.future.set_exception(RuntimeError("the micro-batcher closed"))
            lane.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)
