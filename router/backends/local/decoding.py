"""The local backend's decoding loop: KV cache, greedy or top-p sampling, incremental
detokenisation and stop strings.

:meth:`Decoder.generate` runs in a worker thread (under ``torch.inference_mode()``), hands each
decoded piece of text to ``emit`` as a :class:`TextPiece` and returns how it ended
(:class:`Finished`). It checks the cancel :class:`threading.Event` before every forward pass and
raises :class:`GenerationCancelled` once it is set. Sampling with a ``seed`` uses a per-request
``torch.Generator``; the global RNG is never touched.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from probes.model import LoadedModel
from router.backends.local.params import GenerationParams

__all__ = [
    "Decoder",
    "Emit",
    "Failed",
    "FinishReason",
    "Finished",
    "GenerationCancelled",
    "GenerationEvent",
    "StopMatcher",
    "TextPiece",
    "eos_ids",
    "sample",
]

FinishReason = Literal["stop", "length"]

_GREEDY_BELOW = 1e-5  # temperatures under this are greedy (as vLLM does)
_DETOKENIZE_CONTEXT = 5  # prompt tokens decoded with the first new ones (leading spaces)


# -- what a generation reports -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TextPiece:
    """Newly decoded text."""

    text: str


@dataclass(frozen=True, slots=True)
class Finished:
    """The generation ended: why, and the token counts for ``usage``."""

    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Failed:
    """The generation raised ``error``."""

    error: BaseException


GenerationEvent = TextPiece | Finished | Failed
Emit = Callable[[GenerationEvent], None]


class GenerationCancelled(Exception):
    """Raised in the worker thread when the consumer has stopped listening."""


# -- stop strings ---------------------------------------------------------------------------


class StopMatcher:
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


# -- the loop -------------------------------------------------------------------------------


def eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every end-of-sequence id the generation config, the model config or the tokenizer names."""
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


def sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    """A token drawn from ``softmax(logits / temperature)`` cut to the top-p nucleus."""
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


class Decoder:
    """Decodes with one loaded model (what its ``forward`` accepts is read once, here)."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        model = loaded.model
        self.eos = eos_ids(model, loaded.tokenizer)
        try:
            forward_params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            forward_params = {}  # type: ignore[assignment]
        self._logits_to_keep = "logits_to_keep" in forward_params
        # transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name warns).
        self._cache_kwarg = "cache" if "cache" in forward_params else "past_key_values"

    def generate(self, params: GenerationParams, cancel: threading.Event, emit: Emit) -> Finished:
        """The decoding loop; emits text pieces and returns how it finished (call it under
        ``torch.inference_mode()``)."""
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
        matcher = StopMatcher(params.stop)
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
                raise GenerationCancelled
            extra[self._cache_kwarg] = past
            out = model(input_ids=input_ids, use_cache=True, **extra)
            past = getattr(out, "cache", None)
            if past is None:
                past = getattr(out, "past_key_values", None)
            logits = out.logits[0, -1, :].float()
            if greedy:
                token = int(torch.argmax(logits))
            else:
                token = sample(logits, params.temperature, params.top_p, generator)
            generated += 1
            if token in self.eos and not params.ignore_eos:
                reason = "stop"
                break
            window.append(token)
            piece, stopped = matcher.feed(pending_text(final=False))
            if piece:
                emit(TextPiece(piece))
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
                emit(TextPiece(piece))
        return Finished(reason, len(params.prompt_ids), generated)
