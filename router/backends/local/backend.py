"""The :class:`~router.backends.base.Backend` implementation of the local backend.

``send`` parses the request off the event loop (:class:`~router.backends.local.params.
RequestParser`), waits (FIFO) for one of ``max_concurrency`` slots, starts a
:class:`~router.backends.local.worker.GenerationJob` and returns once the first piece of text
(or the end, or a failure) is known: a failure before then is an
:class:`~router.errors.UpstreamError` the dispatcher may retry elsewhere. The answer is shaped
by :mod:`router.wire`: one ``chat.completion`` / ``text_completion`` body, or a stream of chunks
(one per decoded piece) that raises :class:`~router.errors.UpstreamError` on a mid-stream
failure, as an HTTP backend's stream does (the route ends the client's stream with a generic
error event and ``data: [DONE]``; the exception's text stays in the log).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import Any

import anyio
import anyio.to_thread

from probes.model import LoadedModel
from router.backends.base import Endpoint, UpstreamResult
from router.backends.local.decoding import Decoder, Failed, Finished, TextPiece
from router.backends.local.params import RequestParser, context_length
from router.backends.local.worker import GenerationJob, JobRegistry
from router.errors import UpstreamError, UpstreamStatus
from router.wire import (
    SSE_CONTENT_TYPE,
    SSE_DONE,
    SSE_NO_BUFFERING,
    StreamHead,
    UsageObject,
    completion,
    completion_id,
    envelope,
    json_bytes,
    sse_event,
    usage_object,
)

__all__ = ["LocalBackend"]

logger = logging.getLogger(__name__)


def _usage(finish: Finished) -> UsageObject:
    return usage_object(finish.prompt_tokens, finish.completion_tokens)


class LocalBackend:
    """Generate with an in-process transformers model (see :mod:`router.backends.local`)."""

    def __init__(
        self,
        name: str,
        loaded: LoadedModel,
        *,
        model_name: str = "local",
        max_new_tokens: int = 256,
        max_concurrency: int = 1,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"backend {name!r}: max_new_tokens must be at least 1")
        if max_concurrency < 1:
            raise ValueError(f"backend {name!r}: max_concurrency must be at least 1")
        self.name = name
        self.loaded = loaded
        self.model_name = model_name
        self.max_new_tokens = max_new_tokens
        self.max_concurrency = max_concurrency
        self._slots = anyio.Semaphore(max_concurrency)
        self._jobs = JobRegistry()
        self._closed = False
        config = loaded.model.config
        self._parser = RequestParser(
            loaded.tokenizer,
            vocab_size=int(getattr(config, "vocab_size", 0) or 0),
            context=context_length(config),
            max_new_tokens=max_new_tokens,
        )
        self._decoder = Decoder(loaded)

    @property
    def running(self) -> int:
        """Generation threads running right now."""
        return self._jobs.running

    def model_names(self) -> list[str]:
        return [self.model_name]

    async def ping(self) -> str:
        return f"local model {self.loaded.spec} loaded"

    async def aclose(self) -> None:
        self._closed = True
        jobs = self._jobs.jobs()
        for job in jobs:
            job.cancel.set()
        for job in jobs:
            await job.stop()

    async def send(
        self, endpoint: Endpoint, body: dict[str, Any], *, stream: bool
    ) -> UpstreamResult:
        if self._closed:
            raise UpstreamError(f"backend {self.name!r} is closed")
        if endpoint not in ("chat/completions", "completions"):
            raise UpstreamStatus(
                400,
                envelope(
                    f"the local backend {self.name!r} answers chat.completions and completions "
                    f"only; route /v1/{endpoint} to an openai backend",
                    "invalid_request_error",
                    param=endpoint,
                    code="unsupported_endpoint",
                ),
                "application/json",
            )
        # Tokenising a long prompt (chat template included) takes a while: off the event loop.
        params = await anyio.to_thread.run_sync(self._parser.parse, endpoint, body, stream)
        await self._slots.acquire()
        try:
            if self._closed:
                raise UpstreamError(f"backend {self.name!r} is closed")
            job = GenerationJob(
                self.name,
                params,
                self._decoder.generate,
                registry=self._jobs,
                release=self._slots.release,
            )
            job.start()
        except BaseException:
            self._slots.release()
            raise
        committed = False
        try:
            first = await self._next_event(job)
            if stream:
                result = self._stream_result(endpoint, job, first)
            else:
                result = await self._collect(endpoint, job, first)
            committed = True
            return result
        finally:
            if not committed or not stream:
                await job.stop()
                job.receive.close()

    def _failed(self, event: Failed) -> UpstreamError:
        error = event.error
        return UpstreamError(
            f"backend {self.name!r}: generation failed: {type(error).__name__}: {error}"
        )

    async def _next_event(
        self, job: GenerationJob, ended: str = "ended without a result"
    ) -> TextPiece | Finished:
        """The job's next event; a failure, or the end of its events (``ended``), raises."""
        try:
            event = await job.receive.receive()
        except anyio.EndOfStream:
            raise UpstreamError(f"backend {self.name!r}: generation {ended}") from None
        if isinstance(event, Failed):
            raise self._failed(event) from event.error
        return event

    async def _collect(
        self, endpoint: Endpoint, job: GenerationJob, first: TextPiece | Finished
    ) -> UpstreamResult:
        pieces: list[str] = []
        event = first
        while isinstance(event, TextPiece):
            pieces.append(event.text)
            event = await self._next_event(job)
        payload = completion(
            endpoint,
            id=completion_id(endpoint),
            model=self.model_name,
            text="".join(pieces),
            finish_reason=event.reason,
            usage=_usage(event),
        )
        return UpstreamResult(200, "application/json", body=json_bytes(payload))

    def _stream_result(
        self, endpoint: Endpoint, job: GenerationJob, first: TextPiece | Finished
    ) -> UpstreamResult:
        events = self._events(endpoint, job, first)

        async def close() -> None:
            await job.stop()
            try:
                await events.aclose()
            except RuntimeError:
                # Being iterated by another task right now: with the job stopped, it ends there.
                return
            job.receive.close()

        return UpstreamResult(
            200,
            SSE_CONTENT_TYPE,
            stream=events,
            close=close,
            extra_headers=list(SSE_NO_BUFFERING),
        )

    async def _events(
        self, endpoint: Endpoint, job: GenerationJob, first: TextPiece | Finished
    ) -> AsyncGenerator[bytes, None]:
        head = StreamHead.new(endpoint, self.model_name, usage_field=job.params.include_usage)
        try:
            if endpoint == "chat/completions":
                yield sse_event(head.chunk("", role="assistant"))
            event = first
            while isinstance(event, TextPiece):
                yield sse_event(head.chunk(event.text))
                # the end of the events here: stopped (closed from another task, or by aclose)
                event = await self._next_event(job, "stopped before it finished")
            yield sse_event(head.chunk(None, event.reason))
            if head.usage_field:
                yield sse_event(head.usage_chunk(_usage(event)))
            yield SSE_DONE
        finally:
            await job.stop()
            job.receive.close()
