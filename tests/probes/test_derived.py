"""The derived folder a vLLM pooling server runs for the remote probe (probes/derived.py).

Its final hidden state, read with transformers as a pooling server would, must give the same
metrics as the local probe at the source layer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from probes.derived import DERIVED_INFO, derive_probe_model, derived_name, main
from probes.errors import ProbeInputError
from probes.metrics import compute_all
from probes.probe import SparsityProbe
from probes.types import ProbeSettings


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SPARSITY_ROUTER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _final_states(folder: Path, probe: SparsityProbe, text: str) -> torch.Tensor:
    """What a pooling server returns: the model's last hidden state at the last token."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    ids, _ = probe.encode(text)
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    last: torch.Tensor = out.hidden_states[-1][0, -1]
    return last


@pytest.mark.parametrize("layer", [2, -1])
def test_served_vector_gives_the_probe_metrics(
    tiny_model_dir: Path, cache: Path, layer: int
) -> None:
    probe = SparsityProbe(ProbeSettings(model=str(tiny_model_dir), layers=(layer,), device="cpu"))
    derived = derive_probe_model(str(tiny_model_dir), layer)
    resolved = 2 if layer == 2 else 4
    assert derived.layer == resolved and derived.source_layers == 4 and derived.hidden_size == 64
    assert derived.path.parent == cache / "derived"
    assert derived.name == derived.path.name == derived_name(tiny_model_dir, layer)
    assert f"-L{resolved}of4-" in derived.name
    config = json.loads((derived.path / "config.json").read_text())
    assert config["num_hidden_layers"] == resolved
    info = json.loads((derived.path / DERIVED_INFO).read_text())
    assert info["layer"] == resolved and info["source_layers"] == 4
    with safe_open(str(derived.path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        norm = f.get_tensor("model.norm.weight")
    assert not any(k.startswith(f"model.layers.{resolved}.") for k in keys)
    assert any(k.startswith(f"model.layers.{resolved - 1}.") for k in keys)
    if resolved < 4:  # below the last layer the final norm is a pure rescaling
        assert bool((norm == 1).all())
    for text in ("What is two plus two?", "qz xv kk wp tt"):
        want = probe.measure_one(text).metrics[resolved]
        got = compute_all(_final_states(derived.path, probe, text))
        for name, value in want.items():
            assert float(got[name]) == pytest.approx(value, abs=1e-5), name


def test_built_once_and_named_by_content(tiny_model_dir: Path, cache: Path) -> None:
    first = derive_probe_model(str(tiny_model_dir), 2)
    stamp = (first.path / "model.safetensors").stat().st_mtime_ns
    again = derive_probe_model(str(tiny_model_dir), 2)
    assert again == first
    assert (first.path / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt
    assert derive_probe_model(str(tiny_model_dir), 3).name != first.name
    assert not list((cache / "derived").glob("*.tmp-*"))


def test_layer_zero_and_out_of_range_are_refused(tiny_model_dir: Path, cache: Path) -> None:
    with pytest.raises(ProbeInputError, match="layer 0"):
        derive_probe_model(str(tiny_model_dir), 0)
    with pytest.raises(ProbeInputError, match="out of range"):
        derive_probe_model(str(tiny_model_dir), 5)


def test_cli_prints_path_and_name(
    tiny_model_dir: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--model", str(tiny_model_dir), "--layer", "1"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert main(["--model", str(tiny_model_dir), "--layer", "1", "--name"]) == 0
    assert capsys.readouterr().out.strip() == path.name and path.is_dir()
