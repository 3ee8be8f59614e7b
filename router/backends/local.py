"""An in-process backend: a transformers causal LM generating in a worker thread.

Used for the embedded default (the bundled SmolLM2-135M-Instruct as the "small" model) and for
offline development. It answers ``chat/completions`` and ``completions`` in the OpenAI format,
streamed (server-sent events, one per decoded text piece) or not.

Request fields honoured: ``messages`` / ``prompt``, ``max_completion_tokens`` / ``max_tokens``
(capped at ``max_new_tokens`` and the model's context), ``temperature`` (absent: 1.0 as in the
OpenAI API; 0: greedy), ``top_p``, ``seed`` (a per-request ``torch.Generator``; the global RNG is
never touched), ``stop``, ``n`` (1 only), ``stream_options.include_usage`` and vLLM's
``ignore_eos``. Everything else (tools, response_format, logprobs, ...) is ignored. A field of
the wrong type is answered with :class:`~router.errors.UpstreamStatus` 400 and an OpenAI error
envelope naming the field.

Threads and cancellation: each generation runs its own decoding loop (KV cache, greedy or
top-p sampling, incremental detokenisation) in a daemon thread under ``torch.inference_mode()``;
at most ``max_concurrency`` run at once, later requests wait (FIFO) without blocking the event
loop. The loop checks a :class:`threading.Event` before every step, so closing a stream,
cancelling the awaiting task or :meth:`LocalBackend.aclose` stops the thread within one forward
pass. ``send`` returns once the first piece of text (or the end, or a failure) is known: a
failure before then is an :class:`~router.errors.UpstreamError` the dispatcher may retry
elsewhere; one mid-stream becomes an error event followed by ``data: [DONE]``.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import anyio.from_thread
import anyio.lowlevel
import torch
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from probes.model import LoadedModel
from router.backends.base import Endpoint, UpstreamResult
from router.errors import UpstreamError, UpstreamStatus, envelope

__all__ = ["LocalBackend"]

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]

_GREEDY_BELOW = 1e-5  # temperatures under this are greedy (as vLLM does)
_DETOKENIZE_CONTEXT = 5  # prompt tokens decoded with the first new ones (leading spaces)


# -- parsed request ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Params:
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    ignore_eos: bool
    include_usage: bool


def _bad_request(message: str, param: str | None = None) -> UpstreamStatus:
    return UpstreamStatus(
        400, envelope(message, "invalid_request_error", param), "application/json"
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _optional_int(body: dict[str, Any], key: str, *, minimum: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not _is_int(value):
        raise _bad_request(f"'{key}' must be an integer, got {json.dumps(value)}", key)
    if value < minimum:
        raise _bad_request(f"'{key}' must be at least {minimum}, got {value}", key)
    return int(value)


def _optional_number(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if not _is_number(value) or not math.isfinite(value):
        raise _bad_request(f"'{key}' must be a number, got {json.dumps(value)}", key)
    return float(value)


def _stop_strings(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _bad_request("'stop' must be a string or a list of strings", "stop")
    return tuple(dict.fromkeys(s for s in stop if s))


def _message_text(content: object, index: int) -> str:
    param = f"messages[{index}].content"
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if not isinstance(part, dict):
                raise _bad_request(f"'{param}' parts must be objects", param)
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad_request(
                    f"'{param}': local backends accept text content only "
                    f"(got a part of type {json.dumps(part.get('type'))})",
                    param,
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise _bad_request(f"'{param}' must be a string or a list of content parts", param)


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise _bad_request("'messages' must be a non-empty list of messages", "messages")
    out: list[dict[str, str]] = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise _bad_request(f"'messages[{i}]' must be an object", f"messages[{i}]")
        role = message.get("role")
        if not isinstance(role, str):
            raise _bad_request(f"'messages[{i}].role' must be a string", f"messages[{i}].role")
        out.append({"role": role, "content": _message_text(message.get("content"), i)})
    return out


# -- events from the worker thread ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Piece:
    text: str


@dataclass(frozen=True, slots=True)
class _Finish:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class _Failure:
    error: BaseException


_Event = _Piece | _Finish | _Failure


class _StopMatcher:
    """Accumulates text, cuts it at the first stop string, and holds back a possible prefix."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self.stop = stop
        self.text = ""
        self.emitted = 0
        self._longest = max((len(s) for s in stop), default=0)

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit now, whether a stop string was hit)."""
        start = max(0, len(self.text) - self._longest + 1)
        self.text += delta
        if self.stop:
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                return self.flush(), True
        safe = len(self.text) - self._held_back()
        out = self.text[self.emitted : safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return out, False

    def flush(self) -> str:
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the text that starts some stop string."""
        for k in range(min(self._longest - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0


# -- one generation --------------------------------------------------------------------------


class _Job:
    """A generation running in its own thread, reporting events to the event loop."""

    def __init__(
        self,
        backend: LocalBackend,
        params: _Params,
        release: Callable[[], None],
    ) -> None:
        self.backend = backend
        self.params = params
        self.cancel = threading.Event()
        self._release = release
        self._released = False
        send, receive = anyio.create_memory_object_stream[_Event](math.inf)
        self._send: MemoryObjectSendStream[_Event] = send
        self.receive: MemoryObjectReceiveStream[_Event] = receive
        self._token = anyio.lowlevel.current_token()
        self.thread = threading.Thread(
            target=self._run, name=f"local-generate-{backend.name}", daemon=True
        )

    def start(self) -> None:
        self.thread.start()
        self.backend._jobs.add(self)

    async def stop(self) -> None:
        """Ask the thread to stop, wait until it has, and give the slot back (idempotent)."""
        self.cancel.set()
        with anyio.CancelScope(shield=True):
            if self.thread.is_alive():
                await anyio.to_thread.run_sync(self.thread.join)
            self.backend._jobs.discard(self)
            if not self._released:
                self._released = True
                self._release()

    # The rest runs in the worker thread.
    def _emit(self, event: _Event) -> None:
        if self.cancel.is_set():
            raise _Cancelled
        try:
            anyio.from_thread.run_sync(self._send.send_nowait, event, token=self._token)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, RuntimeError):
            # The consumer went away (or the event loop did): nobody wants the rest.
            self.cancel.set()
            raise _Cancelled from None

    def _run(self) -> None:
        backend = self.backend
        with backend._running_lock:
            backend._running += 1
        try:
            with torch.inference_mode():
                finish = backend._generate(self.params, self.cancel, self._emit)
            self._emit(finish)
        except _Cancelled:
            logger.debug("backend %s: generation cancelled", backend.name)
        except Exception as exc:
            logger.exception("backend %s: generation failed", backend.name)
            try:
                self._emit(_Failure(exc))
            except _Cancelled:
                pass
        finally:
            with backend._running_lock:
                backend._running -= 1
            try:
                anyio.from_thread.run_sync(self._send.close, token=self._token)
            except RuntimeError:  # the event loop is gone
                pass


class _Cancelled(Exception):
    """Raised in the worker thread when the consumer has stopped listening."""


# -- the backend ----------------------------------------------------------------------------


class LocalBackend:
    """Generate with an in-process transformers model (see the module docstring)."""

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
        self._jobs: set[_Job] = set()
        self._running = 0
        self._running_lock = threading.Lock()
        self._closed = False
        model, tokenizer = loaded.model, loaded.tokenizer
        config = model.config
        self._context = int(
            getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 0) or 0
        )
        self._eos = self._eos_ids(model, tokenizer)
        try:
            forward_params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            forward_params = {}  # type: ignore[assignment]
        self._logits_to_keep = "logits_to_keep" in forward_params
        # transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name warns).
        self._cache_kwarg = "cache" if "cache" in forward_params else "past_key_values"

    @staticmethod
    def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
        ids: set[int] = set()
        generation_config = getattr(model, "generation_config", None)
        for value in (
            getattr(generation_config, "eos_token_id", None),
            getattr(model.config, "eos_token_id", None),
            getattr(tokenizer, "eos_token_id", None),
        ):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list | tuple):
                ids.update(int(v) for v in value)
        return frozenset(ids)

    @property
    def running(self) -> int:
        """Generation threads running right now."""
        return self._running

    def model_names(self) -> list[str]:
        return [self.model_name]

    async def ping(self) -> str:
        return f"local model {self.loaded.spec} loaded"

    async def aclose(self) -> None:
        self._closed = True
        for job in list(self._jobs):
            job.cancel.set()
        for job in list(self._jobs):
            await job.stop()

    # -- request parsing -------------------------------------------------------------------
    def _prompt_ids(self, endpoint: Endpoint, body: dict[str, Any]) -> list[int]:
        tokenizer = self.loaded.tokenizer
        if endpoint == "chat/completions":
            messages = _messages(body)
            if getattr(tokenizer, "chat_template", None):
                try:
                    text = tokenizer.apply_chat_template(
                        messages, add_generation_prompt=True, tokenize=False
                    )
                except Exception as exc:  # jinja raises its own types (raise_exception)
                    raise _bad_request(
                        f"the model's chat template rejected the messages: {exc}", "messages"
                    ) from exc
            else:
                text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
                text += "assistant:"
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if isinstance(prompt, str):
                ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
                ids = list(prompt)  # token ids
            elif isinstance(prompt, list) and len(prompt) > 1:
                raise _bad_request(
                    "'prompt': local backends take one prompt per request (a string or a "
                    "list of one string)",
                    "prompt",
                )
            else:
                raise _bad_request("'prompt' must be a string or a list of one string", "prompt")
        ids = [int(t) for t in ids]
        if not ids:
            bos = getattr(tokenizer, "bos_token_id", None)
            if bos is None:
                raise _bad_request("the prompt is empty", "prompt")
            ids = [int(bos)]
        vocab = int(getattr(self.loaded.model.config, "vocab_size", 0) or 0)
        if vocab and any(not 0 <= t < vocab for t in ids):
            raise _bad_request(f"'prompt' has token ids outside 0..{vocab - 1}", "prompt")
        return ids

    def _parse(self, endpoint: Endpoint, body: dict[str, Any], stream: bool) -> _Params:
        if not isinstance(body, dict):
            raise _bad_request("the request body must be a JSON object")
        n = _optional_int(body, "n", minimum=1)
        if n is not None and n > 1:
            raise _bad_request(f"n={n}: n>1 is not supported by local backends", "n")
        requested = _optional_int(body, "max_completion_tokens", minimum=1)
        if requested is None:
            requested = _optional_int(body, "max_tokens", minimum=1)
        temperature = _optional_number(body, "temperature")
        if temperature is not None and temperature < 0:
            raise _bad_request(f"'temperature' must be >= 0, got {temperature:g}", "temperature")
        top_p = _optional_number(body, "top_p")
        if top_p is not None and not 0 < top_p <= 1:
            raise _bad_request(f"'top_p' must be in (0, 1], got {top_p:g}", "top_p")
        seed = _optional_int(body, "seed", minimum=-(2**63))
        stop = _stop_strings(body)
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise _bad_request("'ignore_eos' must be a boolean", "ignore_eos")
        include_usage = False
        options = body.get("stream_options")
        if options is not None:
            if not isinstance(options, dict):
                raise _bad_request("'stream_options' must be an object", "stream_options")
            flag = options.get("include_usage", False)
            if not isinstance(flag, bool):
                raise _bad_request(
                    "'stream_options.include_usage' must be a boolean",
                    "stream_options.include_usage",
                )
            include_usage = flag and stream
        prompt_ids = self._prompt_ids(endpoint, body)
        limit = self.max_new_tokens
        if self._context:
            room = self._context - len(prompt_ids)
            if room < 1:
                raise UpstreamStatus(
                    400,
                    envelope(
                        f"the prompt has {len(prompt_ids)} tokens; this model's context is "
                        f"{self._context} tokens",
                        "invalid_request_error",
                        "messages" if endpoint == "chat/completions" else "prompt",
                        "context_length_exceeded",
                    ),
                    "application/json",
                )
            limit = min(limit, room)
        return _Params(
            prompt_ids=prompt_ids,
            max_new_tokens=min(requested, limit) if requested is not None else limit,
            temperature=1.0 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            seed=seed,
            stop=stop,
            ignore_eos=ignore_eos,
            include_usage=include_usage,
        )

    # -- generation (worker thread) --------------------------------------------------------
    def _generate(
        self, params: _Params, cancel: threading.Event, emit: Callable[[_Event], None]
    ) -> _Finish:
        """The decoding loop; emits text pieces and returns how it finished."""
        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        device = self.loaded.device
        greedy = params.temperature < _GREEDY_BELOW
        generator: torch.Generator | None = None
        if not greedy:
            generator = torch.Generator(device=device)
            if params.seed is None:
                generator.seed()
            else:
                generator.manual_seed(params.seed & 0xFFFF_FFFF_FFFF_FFFF)
        extra: dict[str, Any] = {"logits_to_keep": 1} if self._logits_to_keep else {}

        # Incremental detokenisation (as TGI and vLLM do): decode a short window and emit what
        # it adds, once it no longer ends in an incomplete UTF-8 sequence.
        context = params.prompt_ids[-_DETOKENIZE_CONTEXT:]
        window = list(context)
        prefix_offset, read_offset = 0, len(window)
        matcher = _StopMatcher(params.stop)
        generated = 0
        reason: FinishReason = "length"

        def decode(ids: list[int]) -> str:
            text: str = tokenizer.decode(
                ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
            return text

        def pending_text(final: bool) -> str:
            nonlocal prefix_offset, read_offset
            prefix_text = decode(window[prefix_offset:read_offset])
            new_text = decode(window[prefix_offset:])
            if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
                prefix_offset, read_offset = read_offset, len(window)
                return new_text[len(prefix_text) :]
            return ""

        input_ids = torch.tensor([params.prompt_ids], dtype=torch.long, device=device)
        past: Any = None
        stopped = False
        while True:
            if cancel.is_set():
                raise _Cancelled
            extra[self._cache_kwarg] = past
            out = model(input_ids=input_ids, use_cache=True, **extra)
            past = getattr(out, "cache", None)
            if past is None:
                past = getattr(out, "past_key_values", None)
            logits = out.logits[0, -1, :].float()
            if greedy:
                token = int(torch.argmax(logits))
            else:
                token = _sample(logits, params.temperature, params.top_p, generator)
            generated += 1
            if token in self._eos and not params.ignore_eos:
                reason = "stop"
                break
            window.append(token)
            piece, stopped = matcher.feed(pending_text(final=False))
            if piece:
                emit(_Piece(piece))
            if stopped:
                reason = "stop"
                break
            if generated >= params.max_new_tokens:
                break
            input_ids = torch.tensor([[token]], dtype=torch.long, device=device)
        if not stopped:
            # Text still undecoded (an incomplete UTF-8 tail) or held back as a possible start
            # of a stop string goes out now; it may yet complete a stop string.
            piece, stopped = matcher.feed(pending_text(final=True))
            if stopped:
                reason = "stop"
            piece += matcher.flush()
            if piece:
                emit(_Piece(piece))
        return _Finish(reason, len(params.prompt_ids), generated)

    # -- the Backend protocol --------------------------------------------------------------
    async def send(
        self, endpoint: Endpoint, body: dict[str, Any], *, stream: bool
    ) -> UpstreamResult:
        if self._closed:
            raise UpstreamError(f"backend {self.name!r} is closed")
        if endpoint not in ("chat/completions", "completions"):
            raise UpstreamStatus(
                404,
                envelope(f"local backends do not serve /{endpoint}", "not_found_error"),
                "application/json",
            )
        # Tokenising a long prompt (chat template included) takes a while: off the event loop.
        params = await anyio.to_thread.run_sync(self._parse, endpoint, body, stream)
        await self._slots.acquire()
        try:
            if self._closed:
                raise UpstreamError(f"backend {self.name!r} is closed")
            job = _Job(self, params, self._slots.release)
            job.start()
        except BaseException:
            self._slots.release()
            raise
        committed = False
        try:
            first = await self._first_event(job)
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

    async def _first_event(self, job: _Job) -> _Event:
        try:
            event = await job.receive.receive()
        except anyio.EndOfStream:
            raise UpstreamError(
                f"backend {self.name!r}: generation ended without a result"
            ) from None
        if isinstance(event, _Failure):
            raise UpstreamError(
                f"backend {self.name!r}: generation failed: {type(event.error).__name__}: "
                f"{event.error}"
            ) from event.error
        return event

    async def _collect(self, endpoint: Endpoint, job: _Job, first: _Event) -> UpstreamResult:
        pieces: list[str] = []
        event: _Event = first
        while True:
            if isinstance(event, _Piece):
                pieces.append(event.text)
            elif isinstance(event, _Finish):
                break
            else:
                raise UpstreamError(
                    f"backend {self.name!r}: generation failed: {type(event.error).__name__}: "
                    f"{event.error}"
                ) from event.error
            try:
                event = await job.receive.receive()
            except anyio.EndOfStream:
                raise UpstreamError(
                    f"backend {self.name!r}: generation ended without a result"
                ) from None
        text = "".join(pieces)
        created = int(time.time())
        choice: dict[str, Any]
        if endpoint == "chat/completions":
            ident, kind = f"chatcmpl-{uuid.uuid4().hex}", "chat.completion"
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            ident, kind = f"cmpl-{uuid.uuid4().hex}", "text_completion"
            choice = {"index": 0, "text": text}
        choice |= {"logprobs": None, "finish_reason": event.reason}
        payload = {
            "id": ident,
            "object": kind,
            "created": created,
            "model": self.model_name,
            "choices": [choice],
            "usage": _usage(event),
        }
        return UpstreamResult(200, "application/json", body=json.dumps(payload).encode())

    def _stream_result(self, endpoint: Endpoint, job: _Job, first: _Event) -> UpstreamResult:
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
            "text/event-stream",
            stream=events,
            close=close,
            extra_headers=[("cache-control", "no-cache"), ("x-accel-buffering", "no")],
        )

    async def _events(
        self, endpoint: Endpoint, job: _Job, first: _Event
    ) -> AsyncGenerator[bytes, None]:
        chat = endpoint == "chat/completions"
        ident = f"chatcmpl-{uuid.uuid4().hex}" if chat else f"cmpl-{uuid.uuid4().hex}"
        head: dict[str, Any] = {
            "id": ident,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
        }
        include_usage = job.params.include_usage

        def chunk(text: str | None, finish: FinishReason | None, role: bool = False) -> bytes:
            choice: dict[str, Any] = {"index": 0}
            if chat:
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choice["delta"] = delta
            else:
                choice["text"] = text or ""
            choice |= {"logprobs": None, "finish_reason": finish}
            payload: dict[str, Any] = {**head, "choices": [choice]}
            if include_usage:
                payload["usage"] = None
            return _sse(payload)

        try:
            if chat:
                yield chunk("", None, role=True)
            event: _Event = first
            while True:
                if isinstance(event, _Piece):
                    yield chunk(event.text, None)
                elif isinstance(event, _Finish):
                    yield chunk(None if chat else "", event.reason)
                    if include_usage:
                        yield _sse({**head, "choices": [], "usage": _usage(event)})
                    break
                else:
                    error = event.error
                    logger.warning("backend %s: generation failed mid-stream: %s", self.name, error)
                    yield (
                        b"data: "
                        + envelope(
                            f"generation failed: {type(error).__name__}: {error}", "upstream_error"
                        )
                        + b"\n\n"
                    )
                    break
                try:
                    event = await job.receive.receive()
                except anyio.EndOfStream:
                    # Stopped before finishing (closed from another task, or by aclose).
                    yield (
                        b"data: "
                        + envelope("generation stopped before it finished", "upstream_error")
                        + b"\n\n"
                    )
                    break
            yield b"data: [DONE]\n\n"
        finally:
            await job.stop()
            job.receive.close()


def _sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    logits = logits / temperature
    if top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        # Keep the smallest set of tokens whose probability reaches top_p (at least one).
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        ordered = ordered.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, ordered)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _usage(finish: _Finish) -> dict[str, int]:
    return {
        "prompt_tokens": finish.prompt_tokens,
        "completion_tokens": finish.completion_tokens,
        "total_tokens": finish.prompt_tokens + finish.completion_tokens,
    }


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"
