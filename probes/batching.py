"""An asyncio micro-batcher: requests arriving within ``window_s`` (or until ``max_batch`` are
waiting) share one call of a batch function, run in a dedicated worker thread.

``await batcher.submit(item)`` returns that item's result. The batch function takes a list of
items and returns one entry per item, in order: a result, or an exception for that item alone.
If the batch function raises, every request of that batch (and no other) gets the exception.
A caller that stops waiting (a deadline, a disconnect) is dropped from a batch not yet started;
a batch already running finishes and its result for that caller is thrown away.

While the worker is busy, new requests keep collecting; when it frees up, the next batch starts
at once with up to ``max_batch`` of them (no extra window), so under load batches fill up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["BatchFunction", "MicroBatcher"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

BatchFunction = Callable[[Sequence[T]], Sequence[R | BaseException]]


@dataclass(slots=True)
class _Entry(Generic[T, R]):
    item: T
    future: asyncio.Future[R]


class MicroBatcher(Generic[T, R]):
    def __init__(
        self,
        run_batch: BatchFunction[T, R],
        *,
        max_batch: int = 16,
        window_s: float = 0.005,
        thread_name: str = "micro-batch",
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if window_s < 0:
            raise ValueError("window_s must not be negative")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.window_s = window_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._pending: list[_Entry[T, R]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._busy = False
        self._closed = False
        self.batches = 0  # batch function calls so far
        self.largest = 0  # the largest batch so far

    async def submit(self, item: T) -> R:
        if self._closed:
            raise RuntimeError("the micro-batcher is closed")
        loop = asyncio.get_running_loop()
        entry: _Entry[T, R] = _Entry(item, loop.create_future())
        self._pending.append(entry)
        if not self._busy:
            if len(self._pending) >= self.max_batch or self.window_s == 0:
                self._start(loop)
            elif self._timer is None:
                self._timer = loop.call_later(self.window_s, self._start, loop)
        return await entry.future

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._busy or self._closed:
            return
        self._pending = [e for e in self._pending if not e.future.done()]  # drop the gone
        if not self._pending:
            return
        batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
        self._busy = True
        self.batches += 1
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
        if self._pending:  # what arrived while the worker was busy goes next, at once
            self._start(loop)

    async def aclose(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for entry in self._pending:
            if not entry.future.done():
                entry.future.set_exception(RuntimeError("the micro-batcher closed"))
        self._pending = []
        self._executor.shutdown(wait=False, cancel_futures=True)
