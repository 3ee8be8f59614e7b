"""The feature probe's served vector (probes/served.py, probes/feature_vector.py) and the folder
a vLLM server with the project's plugin runs (probes/derived.py: derive_feature_model).

The decisive check runs the derived feature folder with transformers, as the plugin runs it in
vLLM (hidden states of the captured layers, the last after the final norm), feeds them to
feature_vector, and compares the unpacked vector with what the local probe reports.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from probes.derived import (
    DERIVED_INFO,
    derive_feature_model,
    derive_for_settings,
    derive_probe_model,
    main,
    needs_features,
    served_name,
)
from probes.errors import ProbeInputError
from probes.feature_vector import feature_vector, feature_vectors
from probes.probe import SparsityProbe
from probes.served import CONFIG_KEY, FEATURE_ARCHITECTURE, FeatureLayout
from probes.types import ProbeSettings


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SPARSITY_ROUTER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_layout_follows_the_probe_settings() -> None:
    settings = ProbeSettings(
        layers=(10, 20, -1), score_layer=10, token_mean=True, state_layers=(12, -1)
    )
    layout = FeatureLayout.for_settings(settings, 30, 576)
    assert layout.layers == (10, 20, 30) and layout.state_layers == (12, 30)
    assert layout.captured == (10, 12, 20, 30) and layout.deepest == 30
    m = len(settings.metrics)
    assert layout.width == 3 * m * 2 + 2 * 2 * 576
    assert layout.describe() == f"L10_20_30x{m}m-tm-S12_30"
    assert FeatureLayout.from_json(layout.to_json()) == layout
    assert (
        layout.digest()
        != FeatureLayout.for_settings(
            settings.model_copy(update={"token_mean": False}), 30, 576
        ).digest()
    )
    # score_position mean needs token means even without token_mean
    mean_score = ProbeSettings(layers=(4,), score_position="mean")
    assert FeatureLayout.for_settings(mean_score, 30, 576).token_mean


def test_unpack_places_every_value() -> None:
    layout = FeatureLayout(
        source_layers=4,
        hidden_size=3,
        layers=(2, 4),
        metrics=("gini", "hoyer"),
        token_mean=True,
        state_layers=(1,),
    )
    vector = [float(i) for i in range(layout.width)]
    last, mean, states = layout.unpack(vector)
    assert last == {2: {"gini": 0.0, "hoyer": 1.0}, 4: {"gini": 2.0, "hoyer": 3.0}}
    assert mean == {2: {"gini": 4.0, "hoyer": 5.0}, 4: {"gini": 6.0, "hoyer": 7.0}}
    assert states == {"L1.last": (8.0, 9.0, 10.0), "L1.mean": (11.0, 12.0, 13.0)}
    with pytest.raises(ValueError, match="width 13, the layout has 14"):
        layout.unpack(vector[:-1])


@pytest.mark.parametrize(
    "data, message",
    [
        ({"format": 99}, "format 99"),
        ({"format": 1, "source_layers": 4}, "missing"),
    ],
)
def test_bad_layouts_are_named(data: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FeatureLayout.from_json(data)


def test_which_settings_need_a_feature_model() -> None:
    assert not needs_features(ProbeSettings(layers=(10,)))
    assert not needs_features(ProbeSettings(layers=(10,), score_layer=10))
    assert needs_features(ProbeSettings(layers=(10, 20)))
    assert needs_features(ProbeSettings(layers=(10,), token_mean=True))
    assert needs_features(ProbeSettings(layers=(10,), state_layers=(12,)))
    assert needs_features(ProbeSettings(layers=(0,)))


def _hidden_states(
    folder: Path, ids: list[int], layers: tuple[int, ...], n: int
) -> dict[int, torch.Tensor]:
    """What the plugin's model hands its pooler: each captured layer's (T, d) states, the
    source's last layer after the final norm."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.inference_mode():
        out = model.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    states = {layer: out.hidden_states[layer][0] for layer in layers if layer < n}
    if n in layers:
        states[n] = out.last_hidden_state[0]  # transformers: hidden_states[-1] is after the norm
    return states


@pytest.mark.parametrize(
    "update",
    [
        {"layers": (1, 2, -1), "token_mean": True, "state_layers": (2, -1)},  # deepest = last
        {"layers": (2, 3), "token_mean": True, "state_layers": (1,)},  # cut after layer 3
        {"layers": (0, 1), "score_position": "mean"},  # the embeddings, a mean score
    ],
)
def test_feature_model_serves_what_the_local_probe_measures(
    tiny_model_dir: Path, cache: Path, update: dict[str, object]
) -> None:
    settings = ProbeSettings(model=str(tiny_model_dir), device="cpu").model_copy(update=update)
    probe = SparsityProbe(settings)
    derived = derive_for_settings(settings)
    assert not isinstance(derived, type(derive_probe_model(str(tiny_model_dir), 2)))
    layout = derived.layout  # type: ignore[union-attr]
    assert derived.name == derived.path.name == served_name(settings)
    config = json.loads((derived.path / "config.json").read_text())
    assert config["architectures"] == [FEATURE_ARCHITECTURE]
    assert config["num_hidden_layers"] == layout.deepest
    assert FeatureLayout.from_json(config[CONFIG_KEY]) == layout
    assert config[CONFIG_KEY]["source_architecture"] == "LlamaForCausalLM"
    assert json.loads((derived.path / DERIVED_INFO).read_text())["features"] == layout.to_json()
    for text in ("What is two plus two?", "qz xv kk wp tt", "a"):
        ids, _ = probe.encode(text)
        states = _hidden_states(derived.path, ids, layout.captured, 4)
        last, mean, vectors = layout.unpack(feature_vector(layout, states).tolist())
        want = probe.measure_one(text)
        for layer in layout.layers:
            for name, value in want.metrics[layer].items():
                assert last[layer][name] == pytest.approx(value, abs=1e-5), (layer, name)
            if layout.token_mean:
                assert mean is not None and want.metrics_mean is not None
                for name, value in want.metrics_mean[layer].items():
                    assert mean[layer][name] == pytest.approx(value, abs=1e-5), (layer, name)
        if layout.state_layers:
            assert vectors is not None and want.states is not None
            assert set(vectors) == set(want.states)
            for block, vector in want.states.items():
                diff = max(abs(a - b) for a, b in zip(vectors[block], vector, strict=True))
                assert diff <= 1e-4 * max(1.0, max(map(abs, vector))), block


def test_prompts_computed_together_equal_prompts_computed_alone() -> None:
    """The plugin's pooler computes every prompt a vLLM step finished in one pass."""
    layout = FeatureLayout(
        source_layers=4,
        hidden_size=16,
        layers=(1, 3),
        metrics=("top1_energy", "gini", "outlier_frac"),
        token_mean=True,
        state_layers=(3,),
    )
    torch.manual_seed(0)
    lengths = [5, 1, 12, 2]
    prompts = [{layer: torch.randn(n, 16) for layer in layout.captured} for n in lengths]
    together = feature_vectors(
        layout, {la: torch.cat([p[la] for p in prompts]) for la in layout.captured}, lengths
    )
    assert together.shape == (4, layout.width)
    for row, states in zip(together, prompts, strict=True):
        alone = feature_vector(layout, states)
        assert torch.allclose(row, alone, atol=1e-6)
        # the token mean leaves the first token out (a one-token prompt keeps it)
        n = states[3].shape[0]
        want = states[3][1:].mean(0) if n > 1 else states[3][0]
        assert torch.allclose(alone[-16:], want, atol=1e-6)


def test_feature_folder_is_built_once_and_named_by_layout(
    tiny_model_dir: Path, cache: Path
) -> None:
    settings = ProbeSettings(model=str(tiny_model_dir), layers=(1, 2), token_mean=True)
    layout = FeatureLayout.for_settings(settings, 4, 64)
    first = derive_feature_model(str(tiny_model_dir), layout)
    stamp = (first.path / "model.safetensors").stat().st_mtime_ns
    assert derive_feature_model(str(tiny_model_dir), layout) == first
    assert (first.path / "model.safetensors").stat().st_mtime_ns == stamp
    other = FeatureLayout.for_settings(settings.model_copy(update={"state_layers": (2,)}), 4, 64)
    assert derive_feature_model(str(tiny_model_dir), other).name != first.name
    assert "-L1-2x7m-tm-" in first.name


def test_feature_model_refusals(tiny_model_dir: Path, cache: Path) -> None:
    only_embeddings = FeatureLayout.for_settings(ProbeSettings(layers=(0,)), 4, 64)
    with pytest.raises(ProbeInputError, match="only layer 0"):
        derive_feature_model(str(tiny_model_dir), only_embeddings)
    wrong_size = FeatureLayout.for_settings(ProbeSettings(layers=(1, 2)), 30, 576)
    with pytest.raises(ProbeInputError, match="30 layers and width 576"):
        derive_feature_model(str(tiny_model_dir), wrong_size)


def test_cli_builds_the_feature_folder(
    tiny_model_dir: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "--model",
        str(tiny_model_dir),
        "--layers",
        "1-2,4",
        "--token-mean",
        "--state-layers",
        "2",
    ]
    assert main(args) == 0
    path = Path(capsys.readouterr().out.strip())
    assert main([*args, "--name"]) == 0
    assert capsys.readouterr().out.strip() == path.name
    layout = FeatureLayout.from_json(json.loads((path / "config.json").read_text())[CONFIG_KEY])
    assert layout.layers == (1, 2, 4) and layout.state_layers == (2,) and layout.token_mean
    assert math.isclose(layout.width, 3 * 7 * 2 + 2 * 64)
