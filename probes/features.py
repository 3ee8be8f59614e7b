"""Probe feature tables for offline evaluation and supervised calibration, cached on disk.

:func:`extract` runs the probe over many prompts in one pass per batch and returns, for every
prompt, the oriented sparsity (higher = sparser, :func:`probes.metric_names.sparsity`) of every
requested layer x metric x position ("last" token and token "mean"), the token count, whether the
prompt was tail-truncated, and, when asked, the small model's own perplexity of the prompt (mean
negative log-likelihood of the user's text under the LM head, read from the same forward pass).

Results are cached per prompt under ``cache_dir/<fingerprint digest>/`` in ``.npz`` chunks, keyed
by a hash of the exact rendered prompt, so a re-run, or a run on an overlapping prompt set, only
probes what is new. Chunks are written as they finish, so an interrupted run resumes.

Feature names look like ``L10.top10_energy.last`` or ``L28.top1_energy.mean``
(:mod:`probes.feature_names`); :func:`~probes.feature_names.feature_value` reads one from a
:class:`~probes.types.ProbeResult`, which is how a fitted model is applied to a live request.
The table itself, :class:`~probes.feature_table.FeatureTable`, needs no torch.

With ``state_layers``, the table also holds the probe's pooled hidden vectors at those layers (last
token and token mean, the probe's own representation of the prompt); one coordinate is the feature
``L30.state.last.17`` (:func:`~probes.feature_names.state_feature`), a whole block
``L30.state.last`` (:func:`~probes.feature_names.expand_features` spells it out for a model of known
width). They are cached beside the metrics, per layer, so a run asking for new layers probes only
what is missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from numpy.typing import NDArray

from probes.cache import eval_cache_dir
from probes.feature_names import (
    POSITIONS,
    feature_name,
    state_block,
)
from probes.feature_table import FeatureTable
from probes.metric_names import HIGHER_IS_SPARSER
from probes.metrics import compute_all
from probes.pooling import mean_weights, pooled_states
from probes.probe import SparsityProbe
from probes.types import ProbeInput

__all__ = ["FEATURES_FORMAT", "default_cache_dir", "extract"]

logger = logging.getLogger(__name__)

#: Bumped when the cached numbers change meaning.
FEATURES_FORMAT: Final = "features-v1"
CHUNK: Final = 128


def default_cache_dir() -> Path:
    """``$SPARSITY_ROUTER_CACHE/eval`` or ``~/.cache/sparsity-router/eval``
    (:func:`probes.cache.eval_cache_dir`)."""
    return eval_cache_dir()


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _names(layers: Sequence[int], metrics: Sequence[str]) -> tuple[str, ...]:
    return tuple(feature_name(la, m, p) for p in POSITIONS for la in layers for m in metrics)


def extract(
    probe: SparsityProbe,
    inputs: Sequence[ProbeInput],
    *,
    cache_dir: Path | None = None,
    perplexity: bool = True,
    batch_size: int = 16,
    progress: bool = False,
    on_chunk: Callable[[int, int], None] | None = None,
    state_layers: Sequence[int] = (),
) -> FeatureTable:
    """Features of every input at every layer the probe reports, both positions.

    The probe must have ``token_mean`` enabled. With ``perplexity`` the forward pass runs to the
    last layer and through the LM head (the probe's layers are unaffected). ``state_layers``
    (each one of the probe's layers) also keeps the pooled hidden vectors there
    (``FeatureTable.states``). ``on_chunk(done, total)`` is called after each cached chunk.
    """
    if not probe.token_mean:
        raise ValueError("feature extraction needs a probe with token_mean enabled")
    layers = tuple(sorted(probe.layers))
    outside = sorted(set(state_layers) - set(layers))
    if outside:
        raise ValueError(f"state_layers {outside} are not among the probe's layers {layers}")
    state_layers = tuple(sorted(set(state_layers)))
    blocks = tuple(state_block(la, p) for la in state_layers for p in POSITIONS)
    metrics = tuple(probe.settings.metrics)
    names = _names(layers, metrics)
    fingerprint = {
        **probe.fingerprint(),
        "layers": layers,
        "metrics": metrics,
        "perplexity": perplexity,
        "format": FEATURES_FORMAT,
    }
    folder = (cache_dir or default_cache_dir()) / _digest(json.dumps(fingerprint, sort_keys=True))[
        :16
    ]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fingerprint.json").write_text(json.dumps(fingerprint, indent=1), encoding="utf-8")

    keys = [_digest(probe.render(x, i))[:24] for i, x in enumerate(inputs)]
    cached, vectors = _load_cache(folder, blocks)

    def missing(k: str) -> bool:
        return k not in cached or any(b not in vectors.get(k, {}) for b in blocks)

    todo = list({k: i for i, k in reversed(list(enumerate(keys))) if missing(k)}.values())
    todo.sort()
    if todo:
        logger.info("probing %d of %d prompts (cache: %s)", len(todo), len(keys), folder)
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), unit="prompt", desc="probing", disable=None)
    try:
        for start in range(0, len(todo), CHUNK):
            idx = todo[start : start + CHUNK]
            rows, states = _compute(
                probe,
                [inputs[i] for i in idx],
                layers,
                metrics,
                perplexity,
                batch_size,
                bar,
                state_layers,
            )
            chunk_keys = [keys[i] for i in idx]
            _save_chunk(folder, chunk_keys, rows, states)
            for j, (k, row) in enumerate(zip(chunk_keys, zip(*rows, strict=True), strict=True)):
                cached[k] = row
                vectors.setdefault(k, {}).update({b: v[j] for b, v in states.items()})
            if on_chunk is not None:
                on_chunk(min(start + CHUNK, len(todo)), len(todo))
    finally:
        if bar is not None:
            bar.close()
    vals = np.array([cached[k][0] for k in keys], dtype=np.float64).reshape(len(keys), len(names))
    return FeatureTable(
        names=names,
        values=vals,
        n_tokens=np.array([cached[k][1] for k in keys], dtype=np.float64),
        truncated=np.array([cached[k][2] for k in keys], dtype=bool),
        nll=np.array([cached[k][3] for k in keys], dtype=np.float64),
        states={b: np.stack([vectors[k][b] for k in keys]) for b in blocks},
    )


_Rows = tuple[NDArray[np.float32], NDArray[np.int32], NDArray[np.bool_], NDArray[np.float32]]
_Vectors = dict[str, dict[str, NDArray[np.float32]]]  # prompt key -> block -> (d,)


def _state_array(block: str) -> str:
    """The array name of a block in a chunk file: ``L30.last`` -> ``state_L30_last``."""
    return "state_" + block.replace(".", "_")


def _load_cache(
    folder: Path, blocks: Sequence[str] = ()
) -> tuple[dict[str, tuple[Any, Any, Any, Any]], _Vectors]:
    """Cached rows by prompt key and, for ``blocks``, the hidden vectors any chunk holds."""
    out: dict[str, tuple[Any, Any, Any, Any]] = {}
    vectors: _Vectors = {}
    for path in sorted(folder.glob("chunk-*.npz")):
        try:
            with np.load(path) as z:
                # each z[name] reads and inflates the array from the zip again: once per file
                keys = [str(k) for k in z["keys"].tolist()]
                values, n_tokens, truncated, nll = (
                    z["values"],
                    z["n_tokens"],
                    z["truncated"],
                    z["nll"],
                )
                for j, k in enumerate(keys):
                    out[k] = (values[j], n_tokens[j], truncated[j], nll[j])
                for b in blocks:
                    if _state_array(b) in z.files:
                        arr = z[_state_array(b)]
                        for j, k in enumerate(keys):
                            vectors.setdefault(k, {})[b] = arr[j]
        except (OSError, ValueError, KeyError) as err:  # a damaged chunk is recomputed
            logger.warning("ignoring unreadable feature cache file %s: %s", path, err)
    return out, vectors


def _save_chunk(
    folder: Path, keys: list[str], rows: _Rows, states: dict[str, NDArray[np.float32]]
) -> None:
    name = f"chunk-{_digest(''.join(keys) + ','.join(states))[:16]}.npz"
    tmp = folder / f".{name}.tmp{os.getpid()}.npz"
    values, n_tokens, truncated, nll = rows
    extra = {_state_array(b): v for b, v in states.items()}
    np.savez_compressed(
        tmp,
        keys=np.array(keys),
        values=values,
        n_tokens=n_tokens,
        truncated=truncated,
        nll=nll,
        **extra,  # type: ignore[arg-type]
    )
    os.replace(tmp, folder / name)


def _compute(
    probe: SparsityProbe,
    items: Sequence[ProbeInput],
    layers: tuple[int, ...],
    metrics: tuple[str, ...],
    perplexity: bool,
    batch_size: int,
    bar: Any,
    state_layers: Sequence[int] = (),
) -> tuple[_Rows, dict[str, NDArray[np.float32]]]:
    encoded = [probe.encode(x, i) for i, x in enumerate(items)]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    k = len(layers) * len(metrics)
    values = np.zeros((len(items), 2 * k), dtype=np.float32)
    nll = np.full(len(items), np.nan, dtype=np.float32)
    states_out: dict[str, NDArray[np.float32]] = {}
    head_skip, tail_skip = _template_edges(probe) if perplexity else (0, 0)
    lm_head = probe.loaded.model.get_output_embeddings() if perplexity else None
    final = probe.n_layers
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = [encoded[i][0] for i in rows]
        states, mask = probe.hidden_states(batch)
        weights = mean_weights(mask)
        for block, vecs in pooled_states(states, weights, state_layers).items():
            if block not in states_out:
                states_out[block] = np.zeros((len(items), vecs.shape[1]), dtype=np.float32)
            states_out[block][rows] = vecs.cpu().numpy()
        for li, layer in enumerate(layers):
            h = states[layer]
            last = compute_all(h[:, -1, :], metrics)
            per_token = compute_all(h, metrics)
            for mi, m in enumerate(metrics):
                flip = not HIGHER_IS_SPARSER[m]
                lv = last[m].double().cpu().numpy()
                mv = (per_token[m] * weights).sum(-1).double().cpu().numpy()
                values[rows, li * len(metrics) + mi] = 1.0 - lv if flip else lv
                values[rows, k + li * len(metrics) + mi] = 1.0 - mv if flip else mv
        if lm_head is not None and final in states:
            width = mask.shape[1]
            with torch.inference_mode():
                for r, i in enumerate(rows):
                    ids, truncated = encoded[i]
                    n = len(ids)
                    lo = 1 if truncated else max(1, head_skip)
                    hi = n - tail_skip if n - tail_skip > lo else n
                    hidden = states[final][r, width - n + lo - 1 : width - n + hi - 1]
                    logp = torch.log_softmax(lm_head(hidden.to(lm_head.weight.dtype)).float(), -1)
                    target = torch.tensor(ids[lo:hi], device=logp.device)
                    nll[i] = float(-logp.gather(1, target[:, None]).mean())
        if bar is not None:
            bar.update(len(rows))
    n_tokens = np.array([len(e[0]) for e in encoded], dtype=np.int32)
    truncated_arr = np.array([e[1] for e in encoded], dtype=bool)
    return (values, n_tokens, truncated_arr, nll), states_out


def _template_edges(probe: SparsityProbe) -> tuple[int, int]:
    """Tokens the chat template adds before and after the user's text (common to all prompts)."""
    a, _ = probe.encode("a")
    b, _ = probe.encode("b")
    head = 0
    while head < min(len(a), len(b)) and a[head] == b[head]:
        head += 1
    tail = 0
    while tail < min(len(a), len(b)) - head and a[-1 - tail] == b[-1 - tail]:
        tail += 1
    return head, tail
