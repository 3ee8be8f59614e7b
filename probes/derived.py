"""A copy of the probe model that serves one probe layer as its *final* hidden state.

A pooling server (vLLM's ``--runner pooling``) returns the model's last hidden state after the
final norm. The probe reads the residual stream after decoder layer ``L`` (``hidden_states[L]``),
before any norm. :func:`derive_probe_model` writes a folder that makes the two agree:

* ``num_hidden_layers = L`` and the weights of deeper layers dropped, so the server stops at L;
* the final RMSNorm's weight set to ones (when ``L`` is not the last layer), so the server
  returns ``h_L / rms(h_L)``: a positive rescaling of ``h_L``.

Every metric in :mod:`probes.metrics` is scale invariant, so metrics of the served vector equal
the local probe's up to float rounding. For ``L = n`` (the last layer) the model is kept whole:
the probe reads that layer after the final norm, exactly what the server returns.

The folder lives in the cache next to converted models, is built once (atomic, file-locked,
like :func:`probes.model.convert_gguf`), and its name (:func:`derived_name`) identifies the
source model and the layer: serve it under that name (``--served-model-name``) and the remote
probe can check that a server runs the model it expects. ``sparsity_probe.json`` in the folder
records the same facts.

**Feature models.** The supervised recipes read more: metrics at many layers, token means and
whole hidden vectors. :func:`derive_feature_model` writes a folder for the project's vLLM plugin
(``plugins/vllm_probe``): the source cut after the deepest layer read, its architecture set to
the plugin's, its :class:`~probes.served.FeatureLayout` in ``config.json``; one pooling call then
returns every feature (:mod:`probes.served`). :func:`needs_features` tells which kind a probe
configuration needs, :func:`derive_for_settings` builds it and :func:`served_name` names it
without building.

CLI: ``python -m probes.derived [--model SPEC] [--layer L]`` prints the folder's path; with
``--layers 20-30 --token-mean --state-layers 12,30`` (or any setting beyond one layer at the last
token) the feature folder's. ``sparsity-router derive-probe --config FILE`` does the same for a
gateway configuration.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from probes.cache import COMPLETE_MARKER, cache_dir, file_lock
from probes.catalog import DEFAULT_MODEL
from probes.errors import ModelLoadError, ProbeInputError
from probes.model import model_dir
from probes.served import CONFIG_KEY, FEATURE_ARCHITECTURE, FeatureLayout
from probes.types import ProbeSettings

__all__ = [
    "DERIVED_INFO",
    "FEATURE_SOURCE_ARCHITECTURES",
    "DerivedModel",
    "FeatureModel",
    "derive_feature_model",
    "derive_for_settings",
    "derive_probe_model",
    "derived_name",
    "feature_model_name",
    "main",
    "needs_features",
    "read_config",
    "resolve_layer",
    "served_name",
]

logger = logging.getLogger(__name__)

#: The file in a derived folder that records its source and layer.
DERIVED_INFO = "sparsity_probe.json"
_FORMAT = 1  # bumped whenever the derivation changes what the server computes
_SAMPLE = 4 << 20  # bytes hashed at each end of a large file
#: Source architectures the vLLM feature plugin can wrap (plugins/vllm_probe).
FEATURE_SOURCE_ARCHITECTURES: Final = ("LlamaForCausalLM",)


@dataclass(frozen=True, slots=True)
class DerivedModel:
    """A derived folder and what it serves."""

    path: Path
    name: str  # the served model name the remote probe expects
    layer: int  # the source layer its final hidden state is
    source_layers: int  # num_hidden_layers of the source model
    hidden_size: int


def read_config(source: Path) -> dict[str, Any]:
    """A model folder's config.json, checked to be a decoder-only LM's."""
    config = source / "config.json"
    try:
        data: dict[str, Any] = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {config}: {exc}") from exc
    for key in ("num_hidden_layers", "hidden_size"):
        if not isinstance(data.get(key), int):
            raise ModelLoadError(f"{config} has no integer {key!r}: not a decoder-only LM config")
    return data


def resolve_layer(layer: int, n_layers: int) -> int:
    """A probe layer (negative from the end) as 1..n; 0 (the embeddings) cannot be served."""
    if not -n_layers <= layer <= n_layers:
        raise ProbeInputError(
            f"layer {layer} is out of range for a model with {n_layers} layers: use 1..{n_layers} "
            f"or -{n_layers}..-1"
        )
    resolved = layer if layer >= 0 else n_layers + 1 + layer
    if resolved == 0:
        raise ProbeInputError(
            "layer 0 (the embeddings) cannot be read from a pooling server: use a layer >= 1"
        )
    return resolved


def _source_digest(source: Path) -> str:
    """Identifies the source folder's content, the same on every machine that holds a copy.

    Small files are hashed whole; weight files by size, head (which holds the safetensors
    header) and tail, so that a gateway computes it in milliseconds for any model size.
    """
    digest = hashlib.sha256(f"format={_FORMAT}".encode())
    for file in sorted(p for p in source.iterdir() if p.is_file()):
        if file.name in (COMPLETE_MARKER, DERIVED_INFO) or file.name.endswith(".lock"):
            continue
        size = file.stat().st_size
        digest.update(f"|{file.name}|{size}|".encode())
        with open(file, "rb") as handle:
            if size <= 2 * _SAMPLE:
                digest.update(handle.read())
            else:
                digest.update(handle.read(_SAMPLE))
                handle.seek(size - _SAMPLE)
                digest.update(handle.read(_SAMPLE))
    return digest.hexdigest()[:12]


def derived_name(source: Path, layer: int) -> str:
    """The derived folder's name, also the served model name: ``<source>-L<layer>-<digest>``."""
    n = int(read_config(source)["num_hidden_layers"])
    resolved = resolve_layer(layer, n)
    return f"{source.name[:60]}-L{resolved}of{n}-{_source_digest(source)}"


def derive_probe_model(spec: str = DEFAULT_MODEL, layer: int = 10) -> DerivedModel:
    """Build (once) and return the folder serving ``layer`` of ``spec`` as its final state."""
    source = model_dir(spec)
    config = read_config(source)
    n = int(config["num_hidden_layers"])
    resolved = resolve_layer(layer, n)
    name = derived_name(source, resolved)
    out = DerivedModel(
        path=cache_dir() / "derived" / name,
        name=name,
        layer=resolved,
        source_layers=n,
        hidden_size=int(config["hidden_size"]),
    )
    info = {"source": str(source), "spec": spec, "layer": resolved, "source_layers": n}

    def write(tmp: Path) -> None:
        logger.info("deriving %s (layer %d of %d) from %s", name, resolved, n, source)
        _write_derived(source, config, resolved, tmp, unit_norm=resolved < n)

    _build_once(out.path, write, info)
    return out


@dataclass(frozen=True, slots=True)
class FeatureModel:
    """A derived feature-model folder (:func:`derive_feature_model`) and what it serves."""

    path: Path
    name: str  # the served model name the remote probe expects
    layout: FeatureLayout


def feature_model_name(source: Path, layout: FeatureLayout) -> str:
    """The feature folder's name, also its served name:
    ``<source>-<layout summary>-<layout digest>-<source digest>``."""
    return f"{source.name[:48]}-{layout.describe()}-{layout.digest()}-{_source_digest(source)}"


def derive_feature_model(spec: str, layout: FeatureLayout) -> FeatureModel:
    """Build (once) and return the folder a vLLM server with the project's plugin
    (``plugins/vllm_probe``) runs to serve ``layout``'s features in one pooling call.

    The model is cut after the deepest layer the layout reads (kept whole when that is the
    last, read after the final norm as the local probe does); ``config.json`` names the
    plugin's architecture and records the layout and the source architecture.
    """
    source = model_dir(spec)
    config = read_config(source)
    n = int(config["num_hidden_layers"])
    if layout.source_layers != n or layout.hidden_size != int(config["hidden_size"]):
        raise ProbeInputError(
            f"the feature layout is for a model of {layout.source_layers} layers and width "
            f"{layout.hidden_size}; {spec} has {n} and {config['hidden_size']}"
        )
    if layout.deepest == 0:
        raise ProbeInputError(
            "a feature model reading only layer 0 (the embeddings) has no layer to run: add "
            "a layer >= 1"
        )
    architecture = (config.get("architectures") or ["?"])[0]
    if architecture not in FEATURE_SOURCE_ARCHITECTURES:
        raise ModelLoadError(
            f"{spec} is a {architecture}; the vLLM feature plugin supports "
            f"{', '.join(FEATURE_SOURCE_ARCHITECTURES)} probes: use backend: local for this "
            "model, or a layer-mode server (one layer, last token)"
        )
    name = feature_model_name(source, layout)
    out = FeatureModel(path=cache_dir() / "derived" / name, name=name, layout=layout)
    info = {"source": str(source), "spec": spec, "features": layout.to_json()}

    def write(tmp: Path) -> None:
        logger.info("deriving feature model %s from %s", name, source)
        derived = _write_derived(source, config, layout.deepest, tmp, unit_norm=False)
        derived["architectures"] = [FEATURE_ARCHITECTURE]
        derived[CONFIG_KEY] = {**layout.to_json(), "source_architecture": architecture}
        (tmp / "config.json").write_text(json.dumps(derived, indent=2) + "\n")

    _build_once(out.path, write, info)
    return out


def _build_once(final: Path, write: Callable[[Path], None], info: dict[str, Any]) -> None:
    """Write ``final`` once: in a temporary sibling, under a file lock, then an atomic rename."""
    if (final / COMPLETE_MARKER).is_file():
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final.parent / (final.name + ".lock")):
        if (final / COMPLETE_MARKER).is_file():
            return
        for stale in final.parent.glob(final.name + ".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
        try:
            write(tmp)
            (tmp / DERIVED_INFO).write_text(json.dumps(info, indent=2) + "\n")
            (tmp / COMPLETE_MARKER).write_text(str(info["source"]) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _write_derived(
    source: Path, config: dict[str, Any], layer: int, out: Path, *, unit_norm: bool
) -> dict[str, Any]:
    """Write ``source`` cut after decoder layer ``layer`` into ``out`` (final norm weights set to
    ones with ``unit_norm``); return the config written."""
    import torch
    from safetensors.torch import load_file, save_file

    shards = sorted(source.glob("*.safetensors"))
    if not shards:
        raise ModelLoadError(
            f"{source} has no .safetensors weights: derive from a safetensors folder (bundled "
            "and GGUF models are converted to one automatically)"
        )
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors.update(load_file(str(shard)))
    kept: dict[str, torch.Tensor] = {}
    norm_keys: list[str] = []
    for key, tensor in tensors.items():
        parts = key.split(".")
        if "layers" in parts:
            i = parts.index("layers")
            if i + 1 < len(parts) and parts[i + 1].isdigit() and int(parts[i + 1]) >= layer:
                continue  # a deeper decoder layer: not run, not needed
        if key.endswith("norm.weight") and "layers" not in parts:
            norm_keys.append(key)
            if unit_norm:
                tensor = torch.ones_like(tensor)  # final norm as a pure rescaling
        kept[key] = tensor.contiguous()
    if len(norm_keys) != 1:
        raise ModelLoadError(
            f"{source}: expected one final norm weight (…norm.weight outside the layers), "
            f"found {norm_keys or 'none'}: this architecture is not supported by the remote probe"
        )
    save_file(kept, str(out / "model.safetensors"), metadata={"format": "pt"})
    derived_config = dict(config)
    derived_config["num_hidden_layers"] = layer
    for key in ("layer_types", "sliding_window_pattern"):  # per-layer lists must shrink too
        value = derived_config.get(key)
        if isinstance(value, list):
            derived_config[key] = value[:layer]
    (out / "config.json").write_text(json.dumps(derived_config, indent=2) + "\n")
    for file in source.iterdir():
        if (
            file.is_file()
            and file.suffix != ".safetensors"
            and file.name
            not in (
                "config.json",
                "model.safetensors.index.json",
                COMPLETE_MARKER,
            )
        ):
            shutil.copy2(file, out / file.name)
    return derived_config


def needs_features(settings: ProbeSettings) -> bool:
    """Whether a remote probe with ``settings`` needs a feature model: anything beyond one
    layer (not the embeddings) read at the last token."""
    layers = set(settings.layers) | (
        {settings.score_layer} if settings.score_layer is not None else set()
    )
    return bool(
        len(layers) != 1
        or 0 in layers
        or settings.token_mean
        or settings.score_position == "mean"
        or settings.state_layers
    )


def _layout(settings: ProbeSettings, source: Path) -> FeatureLayout:
    config = read_config(source)
    try:
        return FeatureLayout.for_settings(
            settings, int(config["num_hidden_layers"]), int(config["hidden_size"])
        )
    except ValueError as exc:
        raise ProbeInputError(str(exc)) from None


def served_name(settings: ProbeSettings) -> str:
    """The served model name a remote probe with ``settings`` expects (nothing is built)."""
    source = model_dir(settings.model)
    if needs_features(settings):
        return feature_model_name(source, _layout(settings, source))
    return derived_name(source, settings.score_layer_spec)


def derive_for_settings(settings: ProbeSettings) -> DerivedModel | FeatureModel:
    """Build (once) the folder a vLLM server runs for a remote probe with ``settings``."""
    if needs_features(settings):
        return derive_feature_model(settings.model, _layout(settings, model_dir(settings.model)))
    return derive_probe_model(settings.model, settings.score_layer_spec)


def _int_list(text: str) -> tuple[int, ...]:
    """``"10,20-30"`` -> ``(10, 20, 21, ..., 30)``; negative single layers allowed."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        head, sep, tail = part.partition("-")
        if sep and head:
            out.extend(range(int(head), int(tail) + 1))
        else:
            out.append(int(part))
    return tuple(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m probes.derived",
        description="Build the model folder a vLLM pooling server runs for the remote probe; "
        "print its path (and, with --name, the served model name). One layer at the last "
        "token needs a stock vLLM; more (--layers, --token-mean, --state-layers) builds a "
        "feature model for the project's vLLM plugin (plugins/vllm_probe).",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the probe's model spec")
    parser.add_argument("--layer", type=int, default=10, help="the probe layer (default 10)")
    parser.add_argument("--layers", type=_int_list, help="metric layers, e.g. 10,20-30")
    parser.add_argument("--score-layer", type=int, help="the score's layer (default: last)")
    parser.add_argument("--token-mean", action="store_true", help="token-mean metrics too")
    parser.add_argument(
        "--state-layers", type=_int_list, default=(), help="layers whose vectors are served"
    )
    parser.add_argument("--name", action="store_true", help="print the served name instead")
    args = parser.parse_args(argv)
    settings = ProbeSettings(
        model=args.model,
        layers=args.layers or (args.layer,),
        score_layer=args.score_layer,
        token_mean=args.token_mean,
        state_layers=args.state_layers,
    )
    derived = derive_for_settings(settings)
    print(derived.name if args.name else derived.path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
