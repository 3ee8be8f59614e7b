"""What a vLLM *feature* probe serves: the layout of the one vector a pooling call returns.

The supervised recipes read more than one layer's last-token vector: sparsity metrics at many
layers, at the last token and averaged over tokens, and whole hidden vectors (last token and token
mean) for the regression and the neighbour votes. A vLLM server running the feature model
(:func:`probes.derived.derive_feature_model`, served with the project's vLLM plugin,
``plugins/vllm_probe``) returns all of it in one ``/v1/embeddings`` answer, laid out as
:class:`FeatureLayout` says:

1. for each metric layer (in ``layers`` order): the metrics at the last token (``metrics`` order);
2. with ``token_mean``: for each metric layer, the metrics averaged over tokens;
3. for each state layer (in ``state_layers`` order): the hidden vector at the last token, then
   its token mean (``hidden_size`` values each).

Token means leave out each prompt's first token (an attention sink), unless it is the only one,
exactly as :func:`probes.pooling.mean_weights` does for the local probe. Both sides build the
layout from the same :class:`~probes.types.ProbeSettings` (:meth:`FeatureLayout.for_settings`);
the served model records it in its ``config.json`` and its name carries its digest, so a gateway
can tell a server that computes something else.

Torch-free: the gateway unpacks answers with this module and numpy-free Python.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from probes.feature_names import state_block
from probes.metric_names import METRIC_NAMES
from probes.types import ProbeSettings

__all__ = ["CONFIG_KEY", "FEATURE_ARCHITECTURE", "FeatureLayout", "Unpacked"]

#: The ``config.json`` key of a feature model that holds its layout.
CONFIG_KEY: Final = "sparsity_probe_features"
#: The architecture name the vLLM plugin registers for feature models.
FEATURE_ARCHITECTURE: Final = "SparsityProbeForFeatures"
_FORMAT: Final = 1  # bumped whenever the layout or its computation changes

#: (last-token metrics by layer, token-mean metrics by layer or None, pooled vectors or None)
Unpacked = tuple[
    dict[int, dict[str, float]],
    dict[int, dict[str, float]] | None,
    dict[str, tuple[float, ...]] | None,
]


def _resolve(layer: int, n_layers: int) -> int:
    if not -n_layers <= layer <= n_layers:
        raise ValueError(
            f"layer {layer} is out of range for a model with {n_layers} layers: use "
            f"0..{n_layers} or -{n_layers}..-1"
        )
    return layer if layer >= 0 else n_layers + 1 + layer


@dataclass(frozen=True, slots=True)
class FeatureLayout:
    """Which features a feature model serves, and where each sits in its vector."""

    source_layers: int  # num_hidden_layers of the source model (layer n: after the final norm)
    hidden_size: int
    layers: tuple[int, ...]  # metric layers, resolved to 0..n, in the local probe's order
    metrics: tuple[str, ...]
    token_mean: bool
    state_layers: tuple[int, ...]  # resolved to 0..n

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("a feature layout needs at least one metric layer")
        for layer in (*self.layers, *self.state_layers):
            if not 0 <= layer <= self.source_layers:
                raise ValueError(f"layer {layer} is not in 0..{self.source_layers}")
        unknown = [m for m in self.metrics if m not in METRIC_NAMES]
        if unknown or not self.metrics:
            raise ValueError(f"unknown or no metrics {unknown}: known {', '.join(METRIC_NAMES)}")
        if len(set(self.layers)) != len(self.layers) or len(set(self.state_layers)) != len(
            self.state_layers
        ):
            raise ValueError("layers and state_layers must not repeat")

    @classmethod
    def for_settings(
        cls, settings: ProbeSettings, n_layers: int, hidden_size: int
    ) -> FeatureLayout:
        """The layout that gives what :class:`probes.probe.SparsityProbe` measures with
        ``settings`` on a model of ``n_layers`` layers."""
        score = settings.layers[-1] if settings.score_layer is None else settings.score_layer
        layers = tuple(dict.fromkeys(_resolve(x, n_layers) for x in (*settings.layers, score)))
        states = tuple(dict.fromkeys(_resolve(x, n_layers) for x in settings.state_layers))
        return cls(
            source_layers=n_layers,
            hidden_size=hidden_size,
            layers=layers,
            metrics=tuple(settings.metrics),
            token_mean=settings.token_mean or settings.score_position == "mean",
            state_layers=states,
        )

    # -- shape ----------------------------------------------------------------------------
    @property
    def captured(self) -> tuple[int, ...]:
        """Every layer whose hidden states the model must keep, ascending."""
        return tuple(sorted({*self.layers, *self.state_layers}))

    @property
    def deepest(self) -> int:
        return max(self.captured)

    @property
    def width(self) -> int:
        """Length of the served vector."""
        per_layer = len(self.metrics) * (2 if self.token_mean else 1)
        return len(self.layers) * per_layer + 2 * self.hidden_size * len(self.state_layers)

    # -- identity -------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "source_layers": self.source_layers,
            "hidden_size": self.hidden_size,
            "layers": list(self.layers),
            "metrics": list(self.metrics),
            "token_mean": self.token_mean,
            "state_layers": list(self.state_layers),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FeatureLayout:
        """Read :meth:`to_json`'s output; ValueError naming what is wrong."""
        if data.get("format") != _FORMAT:
            raise ValueError(
                f"feature layout format {data.get('format')!r} is not {_FORMAT}: rebuild the "
                "feature model with this version (python -m probes.derived --config ...)"
            )
        try:
            return cls(
                source_layers=int(data["source_layers"]),
                hidden_size=int(data["hidden_size"]),
                layers=tuple(int(x) for x in data["layers"]),
                metrics=tuple(str(x) for x in data["metrics"]),
                token_mean=bool(data["token_mean"]),
                state_layers=tuple(int(x) for x in data["state_layers"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"feature layout is missing or mistypes {exc}") from None

    def digest(self) -> str:
        """Short digest of the layout (part of the served model's name)."""
        text = json.dumps(self.to_json(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    def describe(self) -> str:
        """A summary for names and messages, ``L10_20-30x7m-tm-S12_18_30``: metric layers, the
        number of metrics, ``tm`` with token means, ``S`` and the state layers."""
        states = "-S" + "_".join(map(str, self.state_layers)) if self.state_layers else ""
        mean = "-tm" if self.token_mean else ""
        return f"L{_spans(self.layers)}x{len(self.metrics)}m{mean}{states}"

    # -- reading an answer ----------------------------------------------------------------
    def unpack(self, vector: Sequence[float]) -> Unpacked:
        """Split a served vector into what a :class:`~probes.types.ProbeResult` holds."""
        if len(vector) != self.width:
            raise ValueError(f"a vector of width {len(vector)}, the layout has {self.width}")
        at = 0
        m = len(self.metrics)

        def table() -> dict[int, dict[str, float]]:
            nonlocal at
            out: dict[int, dict[str, float]] = {}
            for layer in self.layers:
                values = vector[at : at + m]
                out[layer] = {k: float(v) for k, v in zip(self.metrics, values, strict=True)}
                at += m
            return out

        last = table()
        mean = table() if self.token_mean else None
        states: dict[str, tuple[float, ...]] | None = None
        if self.state_layers:
            states = {}
            d = self.hidden_size
            for layer in self.state_layers:
                for position in ("last", "mean"):
                    states[state_block(layer, position)] = tuple(
                        float(v) for v in vector[at : at + d]
                    )
                    at += d
        return last, mean, states


def _spans(layers: Sequence[int]) -> str:
    """``(2, 3, 4, 10)`` -> ``"2-4_10"`` (in sorted order)."""
    out: list[str] = []
    ordered = sorted(layers)
    start = prev = ordered[0]
    for layer in [*ordered[1:], None]:
        if layer is not None and layer == prev + 1:
            prev = layer
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if layer is not None:
            start = prev = layer
    return "_".join(out)
