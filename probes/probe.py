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
"""

from __future__ import annotations

import base64
import copy
import inspect
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from probes.encoding import PromptEncoder
from probes.errors import ProbeInputError
from probes.metrics import METRIC_NAMES, METRICS, compute_all, sparsity
from probes.model import DEFAULT_MODEL, LoadedModel, load_model

__all__ = [
    "PROBE_VERSION",
    "Position",
    "ProbeInput",
    "ProbeResult",
    "ProbeSettings",
    "SparsityProbe",
    "probe_fingerprint",
]

logger = logging.getLogger(__name__)

#: Bumped whenever a change alters probe numbers; part of the fingerprint calibrations check.
PROBE_VERSION = "1"

Position = Literal["last", "mean"]
Message = Mapping[str, Any]
ProbeInput = str | Sequence[Message]


class ProbeSettings(BaseModel):
    """How to probe. Defaults are the configuration chosen from ``bench/signal.py``.

    The default score is the top-10% energy at layer 10 of 30, last prompt token: on held-out
    halves it separates character noise (AUROC 0.98) and random tokens (0.92) from clean GSM8K
    and rises with MATH-500 difficulty (Spearman 0.29, p = 3e-6), while running a third of
    the layers (0.28x the latency of a full forward). The paper's last layer detects shift
    slightly better but costs 0.76x; see bench/results/signal.md.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(DEFAULT_MODEL, description="hub id, local dir, .gguf file or bundled:NAME")
    device: str = "auto"
    dtype: str = "auto"
    layers: tuple[int, ...] = Field((10,), description="layers to report (negative from the end)")
    metrics: tuple[str, ...] = METRIC_NAMES
    score_metric: str = "top10_energy"
    score_layer: int | None = Field(None, description="None: the last entry of layers")
    score_position: Position = "last"
    token_mean: bool = Field(False, description="also report metrics averaged over tokens")
    state_layers: tuple[int, ...] = Field(
        (),
        description="layers whose hidden vectors (last token and token mean) results carry, "
        "for a supervised model on the probe's own representation (negative from the end)",
    )
    max_tokens: int = Field(512, ge=2, le=131072)
    batch_size: int = Field(16, ge=1, le=1024)
    chat_template: bool = True
    system_prompt: str | None = None
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (None: leave)")
    prefix_cache: bool = Field(
        False,
        description="compute the chat template's constant opening (system prompt, 'user' header) "
        "once and reuse its keys/values: same numbers up to float rounding, ~20-30% less work "
        "on typical prompts",
    )

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [m for m in v if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(METRIC_NAMES)}")
        if not v:
            raise ValueError("at least one metric is needed")
        return v

    @field_validator("score_metric")
    @classmethod
    def _known_score_metric(cls, v: str) -> str:
        if v not in METRICS:
            raise ValueError(f"unknown metric {v!r}; known: {', '.join(METRIC_NAMES)}")
        return v

    @field_validator("layers")
    @classmethod
    def _some_layers(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v:
            raise ValueError("at least one layer is needed")
        return v

    @model_validator(mode="after")
    def _score_is_measured(self) -> ProbeSettings:
        if self.score_metric not in self.metrics:
            raise ValueError(f"score_metric {self.score_metric!r} must be one of metrics")
        return self


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What the probe measured on one input.

    ``metrics[layer][name]`` holds raw metric values at the last prompt token;
    ``metrics_mean`` the same averaged over tokens (when enabled). ``score`` is the configured
    headline metric oriented so that higher = sparser (less familiar ground); ``percentile`` is
    filled in by a calibration.
    """

    n_tokens: int
    score: float
    metrics: Mapping[int, Mapping[str, float]]
    metrics_mean: Mapping[int, Mapping[str, float]] | None = None
    truncated: bool = False
    percentile: float | None = None
    p_large: float | None = None  # P(large model does better), from a supervised calibration
    # settings.state_layers: "L30.last" / "L30.mean" -> the pooled hidden vector (float32 values)
    states: Mapping[str, tuple[float, ...]] | None = None

    def value(self, layer: int, name: str, position: Position = "last") -> float:
        table = self.metrics if position == "last" else self.metrics_mean
        if table is None:
            raise KeyError("token-mean metrics were not computed (set token_mean)")
        return table[layer][name]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "n_tokens": self.n_tokens,
            "score": self.score,
            "percentile": self.percentile,
            "p_large": self.p_large,
            "truncated": self.truncated,
            "metrics": _layers_to_json(self.metrics),
        }
        if self.metrics_mean is not None:
            out["metrics_mean"] = _layers_to_json(self.metrics_mean)
        if self.states:
            out["states"] = {k: _vector_to_text(v) for k, v in self.states.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProbeResult:
        mean = data.get("metrics_mean")
        pct = data.get("percentile")
        p_large = data.get("p_large")
        states = data.get("states")
        return cls(
            n_tokens=int(data["n_tokens"]),
            score=float(data["score"]),
            metrics=_layers_from_json(data["metrics"]),
            metrics_mean=_layers_from_json(mean) if mean is not None else None,
            truncated=bool(data.get("truncated", False)),
            percentile=None if pct is None else float(pct),
            p_large=None if p_large is None else float(p_large),
            states={str(k): _vector_from_text(v) for k, v in states.items()} if states else None,
        )


def _layers_to_json(table: Mapping[int, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    return {f"L{layer}": dict(values) for layer, values in table.items()}


def _vector_to_text(vector: Sequence[float]) -> str:
    """A vector as base64 of little-endian float32 (exact: the values are float32 already)."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def _vector_from_text(text: str) -> tuple[float, ...]:
    raw = base64.b64decode(text.encode("ascii"), validate=True)
    if len(raw) % 4:
        raise ValueError("a stored hidden vector must be a whole number of float32 values")
    return tuple(np.frombuffer(raw, dtype="<f4").astype(np.float64).tolist())


def pooled_states(
    states: Mapping[int, torch.Tensor], weights: torch.Tensor, layers: Iterable[int]
) -> dict[str, torch.Tensor]:
    """``{"L<layer>.last": (B, d), "L<layer>.mean": (B, d)}``: each layer's hidden vector at the
    last prompt token and averaged over tokens with ``weights`` (``_mean_weights``), float32."""
    from probes.features import state_block

    out: dict[str, torch.Tensor] = {}
    for layer in layers:
        h = states[layer].float()
        out[state_block(layer, "last")] = h[:, -1, :]
        out[state_block(layer, "mean")] = (h * weights[..., None]).sum(1)
    return out


def _layers_from_json(table: Mapping[str, Mapping[str, Any]]) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for key, values in table.items():
        if not key.startswith("L"):
            raise ValueError(f"layer key {key!r} must look like 'L12'")
        out[int(key[1:])] = {str(k): float(v) for k, v in values.items()}
    return out


class _StopForward(Exception):
    """Raised from a forward hook once the deepest needed layer has run."""


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


def probe_fingerprint(
    settings: ProbeSettings,
    *,
    n_layers: int,
    hidden_size: int,
    dtype: torch.dtype,
    score_layer: int,
) -> dict[str, Any]:
    """The fingerprint of a probe with these settings on a model of this shape: the local probe
    and the remote one (router.remote_probe) share it, so calibrations carry over."""
    s = settings
    return {
        "model": s.model,
        "n_layers": n_layers,
        "hidden_size": hidden_size,
        "dtype": str(dtype).removeprefix("torch."),
        "layer": score_layer,
        "metric": s.score_metric,
        "position": s.score_position,
        "max_tokens": s.max_tokens,
        "chat_template": s.chat_template,
        "system_prompt": s.system_prompt,
        "code_version": PROBE_VERSION,
    }


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
        self.layers: tuple[int, ...] = tuple(
            dict.fromkeys(
                self._resolve_layer(x) for x in (*self.settings.layers, self._score_layer_spec)
            )
        )
        self.score_layer = self._resolve_layer(self._score_layer_spec)
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
    @property
    def _score_layer_spec(self) -> int:
        s = self.settings
        return s.layers[-1] if s.score_layer is None else s.score_layer

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

    def hidden_states(
        self, batch: Sequence[list[int]]
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Left-padded forward pass; returns ({layer: (B, T, d) float32}, attention mask (B, T))."""
        if self.settings.prefix_cache:
            prefix = self._template_prefix()
            if prefix is not None and all(
                len(ids) > len(prefix.ids) and ids[: len(prefix.ids)] == prefix.ids for ids in batch
            ):
                return self._hidden_states_after(prefix, batch)
        input_ids, mask = self._left_pad(batch)
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        return self._forward(input_ids, mask, position_ids), mask

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
        **model_kwargs: Any,
    ) -> dict[int, torch.Tensor]:
        """Run the base model up to the deepest layer; the hooked layers' outputs (float32)."""
        captured: dict[int, torch.Tensor] = {}
        deepest = self.deepest_layer
        handles = []

        # The model may be shared with a generating backend in another thread: the hooks act
        # only on this thread's forward pass.
        owner = threading.get_ident()

        def grab(layer: int, stop: bool) -> Any:
            def hook(_module: nn.Module, _args: Any, output: Any) -> None:
                if threading.get_ident() != owner:
                    return
                tensor = output[0] if isinstance(output, tuple) else output
                captured[layer] = tensor.float()
                if stop:
                    raise _StopForward

            return hook

        try:
            for layer in self._hooked:
                stop = layer == deepest and layer < self.n_layers
                if layer == 0:
                    module = self._base.get_input_embeddings()
                elif layer == self.n_layers and self._norm is not None:
                    module = self._norm
                else:
                    module = self._decoder_layers[layer - 1]
                handles.append(module.register_forward_hook(grab(layer, stop)))
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
                states = self._forward(input_ids, mask, position_ids, **{kwarg: cache})
                prefix = _Prefix(ids, cache, {k: v[0] for k, v in states.items()}, kwarg)
        self._prefix, self._prefix_ready = prefix, True
        return prefix

    def _hidden_states_after(
        self, prefix: _Prefix, batch: Sequence[list[int]]
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
        captured = self._forward(input_ids, attention, position_ids, **{prefix.cache_kwarg: cache})
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

    def _measure_batch(self, chunk: Sequence[_Encoded]) -> list[ProbeResult]:
        states, mask = self.hidden_states([e.ids for e in chunk])
        names = self.settings.metrics
        last: dict[int, dict[str, list[float]]] = {}
        mean: dict[int, dict[str, list[float]]] = {}
        weights = _mean_weights(mask) if self.token_mean or self.state_layers else None
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


def _mean_weights(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) weights averaging over real tokens, leaving out each row's first (sink) token."""
    m = mask.float()
    first = torch.zeros_like(m)
    first.scatter_(1, (mask == 0).sum(-1, keepdim=True).clamp_max(mask.shape[1] - 1), 1.0)
    keep = m - first
    single = keep.sum(-1, keepdim=True) == 0  # one-token prompts: use that token
    keep = torch.where(single, m, keep)
    return keep / keep.sum(-1, keepdim=True)


def _progress(total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="prompt", disable=None, desc="probing")
