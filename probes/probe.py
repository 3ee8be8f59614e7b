"""The sparsity probe: one prefill pass of a small causal LM over a request, reduced to numbers.

``SparsityProbe.measure(inputs)`` takes strings or chat-message lists, applies the model's chat
template with the generation prompt (as the paper does), keeps the *tail* of inputs longer than
``max_tokens``, left-pads a batch, and runs the base model only up to the deepest requested
layer: no LM head, no unused layers. Hidden states are read at the last prompt token and,
optionally, averaged over the prompt's tokens (the first token, an attention sink with outsized
activations, is left out of the average).

Layer numbering follows transformers' ``output_hidden_states``: 0 is the embedding output,
``i`` the output of decoder layer ``i``, and the last layer (``n`` or ``-1``) is taken after the
final norm. Negative indices count from the end.

The values that cross rooms (:class:`~probes.types.ProbeSettings`,
:class:`~probes.types.ProbeResult`, :data:`~probes.types.ProbeInput`, :func:`probe_fingerprint`)
live in the torch-free :mod:`probes.types`.
"""

from __future__ import annotations

import copy
import inspect
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from probes.encoding import PromptEncoder
from probes.errors import ProbeInputError
from probes.metric_names import sparsity
from probes.metrics import compute_all
from probes.model import LoadedModel, load_model
from probes.pooling import mean_weights, pooled_states
from probes.types import (
    ProbeInput,
    ProbeResult,
    ProbeSettings,
    probe_fingerprint,
)

__all__ = ["ProbeAbandoned", "SparsityProbe"]

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised from a forward hook once the deepest needed layer has run."""


class ProbeAbandoned(Exception):
    """A pass given a ``stop`` callable ended early because it returned True (nobody was
    waiting for the results any more)."""


@dataclass(frozen=True, slots=True)
class _Prefix:
    """The template's constant opening: its token ids, KV cache and per-layer hidden states."""

    ids: list[int]
    cache: Any  # transformers Cache, filled up to the deepest layer the probe reads
    states: dict[int, torch.Tensor]  # layer -> (P, d) float32
    cache_kwarg: str  # "cache" (transformers >= 5.x) or "past_key_values"


@dataclass(slots=True)
class _Encoded:
    ids: list[int]
    truncated: bool
    order: int = field(default=0)


def _decoder_parts(model: Any) -> tuple[Any, nn.ModuleList, nn.Module | None]:
    """(base model without LM head, its decoder layers, its final norm) for common families."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else None
    if base is None:
        base = getattr(model, "model", None) or getattr(model, "transformer", None)
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if isinstance(layers, nn.ModuleList):
            norm = getattr(base, "norm", None) or getattr(base, "ln_f", None)
            assert base is not None
            return base, layers, norm
    raise ProbeInputError(
        f"cannot find the decoder layers of {type(model).__name__}: the probe supports "
        "decoder-only models whose base exposes .layers (Llama, Mistral, Qwen, ...) or .h (GPT-2)"
    )


class SparsityProbe:
    """Measures activation sparsity of a causal LM on requests. Thread-safe (one pass at a time)."""

    def __init__(self, settings: ProbeSettings | None = None, *, loaded: LoadedModel | None = None):
        self.settings = settings or ProbeSettings()
        if self.settings.threads is not None:
            torch.set_num_threads(self.settings.threads)
        self.loaded = loaded or load_model(
            self.settings.model, device=self.settings.device, dtype=self.settings.dtype
        )
        self.n_layers = self.loaded.n_layers
        score_spec = self.settings.score_layer_spec
        self.layers: tuple[int, ...] = tuple(
            dict.fromkeys(self._resolve_layer(x) for x in (*self.settings.layers, score_spec))
        )
        self.score_layer = self._resolve_layer(score_spec)
        self.state_layers: tuple[int, ...] = tuple(
            dict.fromkeys(self._resolve_layer(x) for x in self.settings.state_layers)
        )
        self._hooked = tuple(dict.fromkeys((*self.layers, *self.state_layers)))
        self.token_mean = self.settings.token_mean or self.settings.score_position == "mean"
        self._base, self._decoder_layers, self._norm = _decoder_parts(self.loaded.model)
        self._lock = threading.Lock()
        self._prefix: _Prefix | None = None
        self._prefix_ready = False
        self._encoder = PromptEncoder(self.settings, self.loaded.tokenizer)

    # -- configuration -------------------------------------------------------------------
    def _resolve_layer(self, layer: int) -> int:
        n = self.n_layers
        if not -n <= layer <= n:
            raise ProbeInputError(
                f"layer {layer} is out of range for {self.settings.model} ({n} layers): "
                f"use 0..{n} (0 = embeddings) or -{n}..-1"
            )
        return layer if layer >= 0 else n + 1 + layer

    @property
    def deepest_layer(self) -> int:
        return max(self._hooked)

    def fingerprint(self) -> dict[str, Any]:
        """Everything that changes the score's numbers; calibrations must match it."""
        return probe_fingerprint(
            self.settings,
            n_layers=self.n_layers,
            hidden_size=self.loaded.hidden_size,
            dtype=self.loaded.dtype,
            score_layer=self.score_layer,
        )

    # -- input preparation ---------------------------------------------------------------
    def render(self, item: ProbeInput, index: int = 0) -> str:
        """The exact text the model sees for one input (chat template applied when enabled)."""
        return self._encoder.render(item, index)

    def encode(self, item: ProbeInput, index: int = 0) -> tuple[list[int], bool]:
        """Token ids of one input, tail-truncated to ``max_tokens``; and whether it was cut."""
        return self._encoder.encode(item, index)

    # -- measurement ---------------------------------------------------------------------
    def measure(
        self,
        inputs: Iterable[ProbeInput],
        *,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> list[ProbeResult]:
        """Probe every input; results come back in input order.

        Inputs are grouped by token length into batches of ``batch_size`` (less padding), so
        the numbers do not depend on what else is in the batch (up to float rounding).
        """
        encoded = []
        for i, item in enumerate(inputs):
            ids, truncated = self.encode(item, i)
            encoded.append(_Encoded(ids, truncated, i))
        size = batch_size or self.settings.batch_size
        ordered = sorted(encoded, key=lambda e: len(e.ids))
        results: list[ProbeResult | None] = [None] * len(encoded)
        bar = _progress(len(encoded)) if progress else None
        try:
            for start in range(0, len(ordered), size):
                chunk = ordered[start : start + size]
                for enc, res in zip(chunk, self._measure_batch(chunk), strict=True):
                    results[enc.order] = res
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        return [r for r in results if r is not None]

    def measure_one(self, item: ProbeInput) -> ProbeResult:
        return self.measure([item])[0]

    def measure_encoded(
        self,
        encoded: Sequence[tuple[list[int], bool]],
        *,
        stop: Callable[[], bool] | None = None,
    ) -> list[ProbeResult]:
        """One padded forward pass over inputs already encoded with :meth:`encode` (ids, cut),
        results in input order. ``stop`` is asked before the pass and before every layer; once
        it returns True the pass ends and :class:`ProbeAbandoned` is raised."""
        chunk = [_Encoded(ids, truncated, i) for i, (ids, truncated) in enumerate(encoded)]
        return self._measure_batch(chunk, stop=stop)

    def hidden_states(
        self, batch: Sequence[list[int]], *, stop: Callable[[], bool] | None = None
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Left-padded forward pass; returns ({layer: (B, T, d) float32}, attention mask (B, T)).

        ``stop``: see :meth:`measure_encoded`."""
        if self.settings.prefix_cache:
            prefix = self._template_prefix()
            if prefix is not None and all(
                len(ids) > len(prefix.ids) and ids[: len(prefix.ids)] == prefix.ids for ids in batch
            ):
                return self._hidden_states_after(prefix, batch, stop)
        input_ids, mask = self._left_pad(batch)
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        return self._forward(input_ids, mask, position_ids, stop=stop), mask

    def _left_pad(self, batch: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.loaded.device
        width = max(len(ids) for ids in batch)
        pad = int(self.loaded.tokenizer.pad_token_id or 0)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask[row, width - len(ids) :] = 1
        return input_ids.to(dev), mask.to(dev)

    def _forward(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        position_ids: torch.Tensor,
        *,
        stop: Callable[[], bool] | None = None,
        **model_kwargs: Any,
    ) -> dict[int, torch.Tensor]:
        """Run the base model up to the deepest layer; the hooked layers' outputs (float32).

        With ``stop``, asked before every decoder layer: True ends the pass (ProbeAbandoned)."""
        captured: dict[int, torch.Tensor] = {}
        deepest = self.deepest_layer
        handles = []

        # The model may be shared with a generating backend in another thread: the hooks act
        # only on this thread's forward pass.
        owner = threading.get_ident()

        def grab(layer: int, last: bool) -> Any:
            def hook(_module: nn.Module, _args: Any, output: Any) -> None:
                if threading.get_ident() != owner:
                    return
                tensor = output[0] if isinstance(output, tuple) else output
                captured[layer] = tensor.float()
                if last:
                    raise _StopForward

            return hook

        def check(_module: nn.Module, _args: Any) -> None:
            if threading.get_ident() == owner and stop is not None and stop():
                raise ProbeAbandoned("nobody waits for this pass any more")

        if stop is not None and stop():
            raise ProbeAbandoned("nobody waits for this pass any more")
        try:
            if stop is not None:
                for module in self._decoder_layers[: min(deepest, self.n_layers)]:
                    handles.append(module.register_forward_pre_hook(check))
            for layer in self._hooked:
                last = layer == deepest and layer < self.n_layers
                if layer == 0:
                    module = self._base.get_input_embeddings()
                elif layer == self.n_layers and self._norm is not None:
                    module = self._norm
                else:
                    module = self._decoder_layers[layer - 1]
                handles.append(module.register_forward_hook(grab(layer, last)))
            with self._lock, torch.inference_mode():
                try:
                    self._base(
                        input_ids=input_ids,
                        attention_mask=mask,
                        position_ids=position_ids,
                        use_cache=bool(model_kwargs),
                        **model_kwargs,
                    )
                except _StopForward:
                    pass
        finally:
            for handle in handles:
                handle.remove()
        return captured

    # -- prefix cache (settings.prefix_cache) ---------------------------------------------
    def _template_prefix(self) -> _Prefix | None:
        """The token ids every templated input starts with, run once; None when there are none.

        Found as the common start of two different rendered inputs, so it covers the chat
        template's opening and any configured system prompt. Causal attention makes its keys,
        values and hidden states independent of what follows, so they are computed once.
        """
        if self._prefix_ready:
            return self._prefix
        prefix: _Prefix | None = None
        params = inspect.signature(self._base.forward).parameters
        kwarg = next((k for k in ("cache", "past_key_values") if k in params), None)
        if kwarg is not None and self.settings.chat_template:
            a, _ = self.encode("a")
            b, _ = self.encode("b")
            n = 0
            while n < min(len(a), len(b)) - 1 and a[n] == b[n]:
                n += 1
            if n >= 2:
                from transformers import DynamicCache

                try:
                    cache = DynamicCache(config=self.loaded.model.config)
                except TypeError:  # older transformers
                    cache = DynamicCache()
                ids = a[:n]
                input_ids, mask = self._left_pad([ids])
                position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
                opening: dict[str, Any] = {kwarg: cache}
                states = self._forward(input_ids, mask, position_ids, **opening)
                prefix = _Prefix(ids, cache, {k: v[0] for k, v in states.items()}, kwarg)
        self._prefix, self._prefix_ready = prefix, True
        return prefix

    def _hidden_states_after(
        self, prefix: _Prefix, batch: Sequence[list[int]], stop: Callable[[], bool] | None = None
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """``hidden_states`` for inputs that start with the prefix: run only what follows it.

        The rest is left-padded after the cached prefix ([prefix | pads | rest], pads masked,
        positions continuing from the prefix), then the outputs are laid out as the plain path
        lays them out ([pads | prefix | rest]) so callers cannot tell the difference.
        """
        p = len(prefix.ids)
        input_ids, mask = self._left_pad([ids[p:] for ids in batch])
        rows, width = mask.shape
        position_ids = p + (mask.cumsum(-1) - 1).clamp_min(0)
        attention = torch.cat([mask.new_ones(rows, p), mask], dim=1)
        cache = copy.deepcopy(prefix.cache)
        if rows > 1:
            cache.batch_repeat_interleave(rows)
        past: dict[str, Any] = {prefix.cache_kwarg: cache}
        captured = self._forward(input_ids, attention, position_ids, stop=stop, **past)
        lengths = [int(n) for n in mask.sum(-1).tolist()]
        full_mask = torch.zeros((rows, p + width), dtype=mask.dtype, device=mask.device)
        states: dict[int, torch.Tensor] = {}
        for layer, h in captured.items():
            full = h.new_zeros((rows, p + width, h.shape[-1]))
            for row, n in enumerate(lengths):
                start = width - n
                full[row, start : start + p] = prefix.states[layer]
                full[row, start + p :] = h[row, start:]
            states[layer] = full
        for row, n in enumerate(lengths):
            full_mask[row, width - n :] = 1
        return states, full_mask

    def _measure_batch(
        self, chunk: Sequence[_Encoded], *, stop: Callable[[], bool] | None = None
    ) -> list[ProbeResult]:
        states, mask = self.hidden_states([e.ids for e in chunk], stop=stop)
        names = self.settings.metrics
        last: dict[int, dict[str, list[float]]] = {}
        mean: dict[int, dict[str, list[float]]] = {}
        weights = mean_weights(mask) if self.token_mean or self.state_layers else None
        vectors: dict[str, list[tuple[float, ...]]] = {}
        if self.state_layers:
            assert weights is not None
            for block, v in pooled_states(states, weights, self.state_layers).items():
                vectors[block] = [tuple(row) for row in v.tolist()]
        for layer in self.layers:
            h = states[layer]
            last[layer] = {k: v.tolist() for k, v in compute_all(h[:, -1, :], names).items()}
            if self.token_mean:
                assert weights is not None
                per_token = compute_all(h, names)
                mean[layer] = {k: (v * weights).sum(-1).tolist() for k, v in per_token.items()}
        s = self.settings
        out = []
        for row, enc in enumerate(chunk):
            row_last = {layer: {k: vals[row] for k, vals in m.items()} for layer, m in last.items()}
            row_mean = (
                {layer: {k: vals[row] for k, vals in m.items()} for layer, m in mean.items()}
                if self.token_mean
                else None
            )
            table = row_last if s.score_position == "last" else row_mean
            assert table is not None
            raw = table[self.score_layer][s.score_metric]
            out.append(
                ProbeResult(
                    n_tokens=len(enc.ids),
                    score=sparsity(s.score_metric, raw),
                    metrics=row_last,
                    metrics_mean=row_mean,
                    truncated=enc.truncated,
                    states={b: v[row] for b, v in vectors.items()} if vectors else None,
                )
            )
        return out


def _progress(total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="prompt", disable=None, desc="probing")
