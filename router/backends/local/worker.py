"""The local backend's worker threads: one daemon thread per generation.

A :class:`GenerationJob` runs ``generate`` (:meth:`~router.backends.local.decoding.Decoder.
generate`) under ``torch.inference_mode()`` in its own thread and passes what it reports
(:data:`~router.backends.local.decoding.GenerationEvent`) to the event loop through an unbounded
memory stream (:attr:`GenerationJob.receive`), ending with a
:class:`~router.backends.local.decoding.Finished` or a
:class:`~router.backends.local.decoding.Failed`. :meth:`GenerationJob.stop` sets the cancel
event, waits for the thread (the loop notices within one forward pass) and gives the
concurrency slot back; so does the consumer going away. A :class:`JobRegistry` keeps a backend's
live jobs (to stop them on close) and counts its running threads.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import torch
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from router.backends.local.decoding import (
    Emit,
    Failed,
    Finished,
    GenerationCancelled,
    GenerationEvent,
)
from router.backends.local.params import GenerationParams

__all__ = ["Generate", "GenerationJob", "JobRegistry"]

logger = logging.getLogger(__name__)

Generate = Callable[[GenerationParams, threading.Event, Emit], Finished]


class JobRegistry:
    """One backend's jobs started and not yet stopped, and its generation threads running."""

    def __init__(self) -> None:
        self._jobs: set[GenerationJob] = set()
        self._running = 0
        self._lock = threading.Lock()

    @property
    def running(self) -> int:
        """Generation threads running right now."""
        return self._running

    def jobs(self) -> list[GenerationJob]:
        return list(self._jobs)

    def add(self, job: GenerationJob) -> None:
        self._jobs.add(job)

    def discard(self, job: GenerationJob) -> None:
        self._jobs.discard(job)

    def thread_started(self) -> None:
        with self._lock:
            self._running += 1

    def thread_finished(self) -> None:
        with self._lock:
            self._running -= 1


class GenerationJob:
    """A generation running in its own thread, reporting events to the event loop.

    Create and start it on the event loop; ``release`` is called once, when it is stopped.
    """

    def __init__(
        self,
        name: str,
        params: GenerationParams,
        generate: Generate,
        *,
        registry: JobRegistry,
        release: Callable[[], None],
    ) -> None:
        self.name = name
        self.params = params
        self.cancel = threading.Event()
        self._generate = generate
        self._registry = registry
        self._release = release
        self._released = False
        send, receive = anyio.create_memory_object_stream[GenerationEvent](math.inf)
        self._send: MemoryObjectSendStream[GenerationEvent] = send
        self.receive: MemoryObjectReceiveStream[GenerationEvent] = receive
        self._token = anyio.lowlevel.current_token()
        self.thread = threading.Thread(target=self._run, name=f"local-generate-{name}", daemon=True)

    def start(self) -> None:
        self.thread.start()
        self._registry.add(self)

    async def stop(self) -> None:
        """Ask the thread to stop, wait until it has, and give the slot back (idempotent)."""
        self.cancel.set()
        with anyio.CancelScope(shield=True):
            if self.thread.is_alive():
                await anyio.to_thread.run_sync(self.thread.join)
            self._registry.discard(self)
            if not self._released:
                self._released = True
                self._release()

    # The rest runs in the worker thread.
    def _emit(self, event: GenerationEvent) -> None:
        if self.cancel.is_set():
            raise GenerationCancelled
        try:
            anyio.from_thread.run_sync(self._send.send_nowait, event, token=self._token)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, RuntimeError):
            # The consumer went away (or the event loop did): nobody wants the rest.
            self.cancel.set()
            raise GenerationCancelled from None

    def _run(self) -> None:
        self._registry.thread_started()
        try:
            with torch.inference_mode():
                finish = self._generate(self.params, self.cancel, self._emit)
            self._emit(finish)
        except GenerationCancelled:
            logger.debug("backend %s: generation cancelled", self.name)
        except Exception as exc:
            logger.exception("backend %s: generation failed", self.name)
            try:
                self._emit(Failed(exc))
            except GenerationCancelled:
                pass
        finally:
            self._registry.thread_finished()
            try:
                anyio.from_thread.run_sync(self._send.close, token=self._token)
            except RuntimeError:  # the event loop is gone
                pass
