"""Feature tables for offline evaluation: what the probe measures on labelled prompts, and the
design matrices the routers are fitted on.

:func:`feature_table` probes prompts once, at every layer of the probe model, both positions,
with the model's perplexity of the prompt and the hidden vectors the default recipes read,
through the on-disk feature cache (:func:`probes.features.extract`): re-running ``eval`` or
``calibrate --labels`` on the same prompts probes nothing. :func:`supervised_matrix` turns a
table into the supervised router's design matrix; :func:`results_from_table` rebuilds the probe
results a calibration is fitted on.

Measuring needs torch (imported when a probe is built or run); reading a table does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from evaluation.recipes import SUPERVISED_FEATURES, neighbour_layers
from probes.feature_names import expand_features, parse_state_block, state_block
from probes.feature_table import FeatureTable
from probes.metric_names import HIGHER_IS_SPARSER, METRIC_NAMES, sparsity
from probes.supervised import LENGTH_FEATURE, SupervisedModel, required_probe
from probes.types import ProbeInput, ProbeResult

if TYPE_CHECKING:
    from probes.probe import SparsityProbe

__all__ = [
    "FloatArray",
    "all_layer_probe",
    "block_key",
    "block_vectors",
    "feature_table",
    "probe_feeding",
    "results_from_table",
    "supervised_matrix",
    "table_features",
]

FloatArray = NDArray[np.float64]


def all_layer_probe(probe: SparsityProbe) -> SparsityProbe:
    """``probe`` measuring every layer, every metric and token means (same loaded model)."""
    from probes.probe import SparsityProbe

    s = probe.settings
    settings = type(s)(
        model=s.model,
        device=s.device,
        dtype=s.dtype,
        max_tokens=s.max_tokens,
        batch_size=s.batch_size,
        chat_template=s.chat_template,
        system_prompt=s.system_prompt,
        threads=s.threads,
        metrics=METRIC_NAMES,
        layers=tuple(range(1, probe.n_layers + 1)),
        token_mean=True,
    )
    return SparsityProbe(settings, loaded=probe.loaded)


def probe_feeding(probe: SparsityProbe, model: SupervisedModel) -> SparsityProbe:
    """``probe`` also measuring what ``model`` reads (layers, token means, hidden vectors); the
    score and the fingerprint stay as they are."""
    from probes.probe import SparsityProbe

    need = required_probe([model])
    s = probe.settings
    layers = tuple(dict.fromkeys((*s.layers, *need["layers"])))
    states = tuple(dict.fromkeys((*s.state_layers, *need["state_layers"])))
    token_mean = s.token_mean or bool(need["token_mean"])
    if (layers, states, token_mean) == (s.layers, s.state_layers, s.token_mean):
        return probe
    update = {
        "layers": layers,
        "score_layer": probe.score_layer,
        "token_mean": token_mean,
        "state_layers": states,
    }
    return SparsityProbe(s.model_copy(update=update), loaded=probe.loaded)


def feature_table(
    probe: SparsityProbe,
    prompts: Sequence[ProbeInput],
    cache: Path | None,
    *,
    progress: bool = True,
    state_layers: Sequence[int] = (),
) -> FeatureTable:
    """Features of every layer (both positions, perplexity) for ``prompts`` (texts or chat
    conversations), and the hidden vectors of the last layer, of the default neighbour votes'
    layers and of ``state_layers``, via the cache (keyed by the rendered input)."""
    from probes.features import extract

    full = all_layer_probe(probe)
    return extract(
        full,
        prompts,
        cache_dir=cache,
        progress=progress,
        batch_size=probe.settings.batch_size,
        state_layers=sorted({full.n_layers, *neighbour_layers(full.n_layers), *state_layers}),
    )


def results_from_table(probe: SparsityProbe, table: FeatureTable) -> list[ProbeResult]:
    """Probe results as ``probe`` would have reported them, rebuilt from cached features."""
    s = probe.settings

    def raw(i: int, layer: int, metric: str, pos: str) -> float:
        oriented = float(table.values[i, table.names.index(f"L{layer}.{metric}.{pos}")])
        return oriented if HIGHER_IS_SPARSER[metric] else 1.0 - oriented

    out = []
    for i in range(len(table)):
        last = {la: {m: raw(i, la, m, "last") for m in s.metrics} for la in probe.layers}
        mean = (
            {la: {m: raw(i, la, m, "mean") for m in s.metrics} for la in probe.layers}
            if probe.token_mean
            else None
        )
        table_for_score = last if s.score_position == "last" else mean
        assert table_for_score is not None
        out.append(
            ProbeResult(
                n_tokens=int(table.n_tokens[i]),
                score=sparsity(s.score_metric, table_for_score[probe.score_layer][s.score_metric]),
                metrics=last,
                metrics_mean=mean,
                truncated=bool(table.truncated[i]),
            )
        )
    return out


def table_features(table: FeatureTable, features: Sequence[str]) -> tuple[str, ...]:
    """``features`` with hidden-vector blocks (``L30.state.last``) spelled out to the width of
    the table's vectors (KeyError when the table lacks a block's vectors)."""

    def width(layer: int, position: str) -> int:
        block = state_block(layer, position)
        if block not in table.states:
            raise KeyError(f"the feature table holds no {block} hidden vectors")
        return int(table.states[block].shape[1])

    return expand_features(features, width)


def supervised_matrix(
    table: FeatureTable, features: Sequence[str] = SUPERVISED_FEATURES, *, length: bool = True
) -> tuple[FloatArray, list[str]]:
    """The supervised router's design matrix (and its feature names) from a feature table;
    hidden-vector blocks are spelled out coordinate by coordinate."""
    names = list(table_features(table, features))
    X = table.matrix(names)
    if length:
        X = np.column_stack([X, np.log(np.maximum(table.n_tokens, 1.0))])
        names.append(LENGTH_FEATURE)
    return X, names


def block_key(block: str) -> str:
    """``"L12.state.mean"`` -> its key in ``FeatureTable.states``, ``"L12.mean"``."""
    parsed = parse_state_block(block)
    if parsed is None:
        raise ValueError(f"{block!r} must look like 'L<layer>.state.<last|mean>'")
    return state_block(*parsed)


def block_vectors(table: FeatureTable, block: str) -> NDArray[np.float32]:
    """The table's hidden vectors of ``block`` ("L12.state.mean"; KeyError when missing)."""
    key = block_key(block)
    if key not in table.states:
        raise KeyError(f"the feature table holds no {key} hidden vectors")
    return table.states[key]
