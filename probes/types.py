"""The probe's values that cross rooms, without torch: settings, inputs, results, fingerprint.

A gateway parses a configuration (:class:`ProbeSettings`), a request (:data:`ProbeInput`) or a
stored result (:class:`ProbeResult`) with this module alone; only measuring
(:class:`probes.probe.SparsityProbe`) needs torch.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from probes.catalog import DEFAULT_MODEL
from probes.metric_names import METRIC_NAMES

__all__ = [
    "PROBE_VERSION",
    "Message",
    "Position",
    "ProbeInput",
    "ProbeResult",
    "ProbeSettings",
    "probe_fingerprint",
]

#: Bumped whenever a change alters probe numbers; part of the fingerprint calibrations check.
PROBE_VERSION: Final = "1"

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
    device: str = Field(
        "auto", description="auto (CUDA when present, else CPU), cpu, cuda or cuda:N"
    )
    dtype: str = Field(
        "auto", description="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16 or float16"
    )
    layers: tuple[int, ...] = Field((10,), description="layers to report (negative from the end)")
    metrics: tuple[str, ...] = Field(METRIC_NAMES, description="metrics computed at every layer")
    score_metric: str = Field(
        "top10_energy", description="the headline score (one of metrics), oriented higher = sparser"
    )
    score_layer: int | None = Field(None, description="null: the last entry of layers")
    score_position: Position = Field(
        "last", description="last: the last prompt token; mean: averaged over tokens"
    )
    token_mean: bool = Field(False, description="also report metrics averaged over tokens")
    state_layers: tuple[int, ...] = Field(
        (),
        description="layers whose hidden vectors (last token and token mean) results carry, "
        "for a supervised model on the probe's own representation (negative from the end)",
    )
    max_tokens: int = Field(
        512, ge=2, le=131072, description="longest input, in tokens; longer ones keep their tail"
    )
    max_messages: int | None = Field(
        None,
        ge=1,
        description="most chat messages read, the last ones kept (a leading system message "
        "too is dropped when it is not among them), before the chat template: a long "
        "conversation costs what a max_tokens one does; null: max_tokens (every message "
        "renders to at least one token, so the cut never reaches the max_tokens tail)",
    )
    max_chars: int | None = Field(
        None,
        ge=1,
        description="most characters of text read (message contents together, or the "
        "prompt), the last ones kept, before the chat template and the tokenizer; null: "
        "64 x max_tokens (a token of text is about 4 characters, the longest in the bundled "
        "vocabulary 81: the cut stays outside the max_tokens tail)",
    )
    batch_size: int = Field(
        16, ge=1, le=1024, description="inputs per forward pass when probing a list of inputs"
    )
    chat_template: bool = Field(
        True, description="wrap inputs in the model's chat template, when it has one"
    )
    system_prompt: str | None = Field(
        None, description="system message added to inputs that have none; null: none"
    )
    threads: int | None = Field(
        None, ge=1, description="torch intra-op threads (null: leave as is)"
    )
    prefix_cache: bool = Field(
        False,
        description="compute the chat template's constant opening (system prompt, 'user' header) "
        "once and reuse its keys/values: same numbers up to float rounding, ~20-30% less work "
        "on typical prompts",
    )

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [m for m in v if m not in METRIC_NAMES]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(METRIC_NAMES)}")
        if not v:
            raise ValueError("at least one metric is needed")
        return v

    @field_validator("score_metric")
    @classmethod
    def _known_score_metric(cls, v: str) -> str:
        if v not in METRIC_NAMES:
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

    @property
    def score_layer_spec(self) -> int:
        """The score's layer as configured (negative from the end): ``score_layer``, else the
        last entry of ``layers``."""
        return self.layers[-1] if self.score_layer is None else self.score_layer

    @property
    def message_limit(self) -> int:
        """``max_messages``, or its default: ``max_tokens``."""
        return self.max_messages if self.max_messages is not None else self.max_tokens

    @property
    def char_limit(self) -> int:
        """``max_chars``, or its default: 64 x ``max_tokens``."""
        return self.max_chars if self.max_chars is not None else 64 * self.max_tokens


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
    # N-way routing (best_of rules): model -> (its predicted quality in [0, 1], its cost in the
    # unit of the calibration's N-way model), from a calibration's N-way model
    qualities: Mapping[str, tuple[float, float]] | None = None

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


def _layers_from_json(table: Mapping[str, Mapping[str, Any]]) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for key, values in table.items():
        if not key.startswith("L"):
            raise ValueError(f"layer key {key!r} must look like 'L12'")
        out[int(key[1:])] = {str(k): float(v) for k, v in values.items()}
    return out


def _vector_to_text(vector: Sequence[float]) -> str:
    """A vector as base64 of little-endian float32 (exact: the values are float32 already)."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def _vector_from_text(text: str) -> tuple[float, ...]:
    raw = base64.b64decode(text.encode("ascii"), validate=True)
    if len(raw) % 4:
        raise ValueError("a stored hidden vector must be a whole number of float32 values")
    return tuple(np.frombuffer(raw, dtype="<f4").astype(np.float64).tolist())


def probe_fingerprint(
    settings: ProbeSettings,
    *,
    n_layers: int,
    hidden_size: int,
    dtype: object,
    score_layer: int,
) -> dict[str, Any]:
    """The fingerprint of a probe with these settings on a model of this shape: the local probe
    and the remote one (router.remote_probe) share it, so calibrations carry over.

    ``dtype`` is the model's ``torch.dtype`` (or its name, ``"float32"``).
    """
    s = settings
    fingerprint: dict[str, Any] = {
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
    # Only when set: their defaults never cut what max_tokens keeps (same numbers), and
    # calibrations fitted before they existed keep matching.
    if s.max_messages is not None:
        fingerprint["max_messages"] = s.max_messages
    if s.max_chars is not None:
        fingerprint["max_chars"] = s.max_chars
    return fingerprint
