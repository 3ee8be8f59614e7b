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

The modules, by concern:

- :mod:`~router.backends.local.params`: request body → :class:`GenerationParams` (validation);
- :mod:`~router.backends.local.decoding`: the decoding loop (:class:`Decoder`);
- :mod:`~router.backends.local.worker`: the worker thread (:class:`GenerationJob`);
- :mod:`~router.backends.local.backend`: :class:`LocalBackend`, the ``Backend`` implementation
  (OpenAI shapes from :mod:`router.wire`).
"""

from __future__ import annotations

from router.backends.local.backend import LocalBackend
from router.backends.local.decoding import Decoder
from router.backends.local.params import GenerationParams, RequestParser
from router.backends.local.worker import GenerationJob

__all__ = ["Decoder", "GenerationJob", "GenerationParams", "LocalBackend", "RequestParser"]
