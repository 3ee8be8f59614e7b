"""The torch-free leaf modules of ``probes`` import without torch, and their values behave."""

from __future__ import annotations

import subprocess
import sys

import pytest

from probes.feature_names import (
    expand_features,
    feature_name,
    feature_value,
    parse_feature,
    parse_state_block,
    parse_state_feature,
    state_block,
    state_feature,
)
from probes.metric_names import METRIC_NAMES, sparsity
from probes.types import PROBE_VERSION, ProbeResult, ProbeSettings, probe_fingerprint

TORCH_FREE = (
    "probes.types",
    "probes.answers",
    "probes.feature_names",
    "probes.feature_table",
    "probes.metric_names",
    "probes.catalog",
    "probes.cache",
    "probes.errors",
    "probes.encoding",
    "probes.inputs",
    "probes.neighbours",
    "probes.supervised",
    "probes.calibration",
)


@pytest.mark.parametrize("module", TORCH_FREE)
def test_imports_without_torch(module: str) -> None:
    code = (
        "import importlib, sys\n"
        f"importlib.import_module({module!r})\n"
        "assert 'torch' not in sys.modules, 'importing it loaded torch'\n"
        "assert 'transformers' not in sys.modules, 'importing it loaded transformers'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_settings_defaults_and_validation() -> None:
    settings = ProbeSettings()
    assert settings.metrics == METRIC_NAMES
    assert settings.score_metric in settings.metrics
    with pytest.raises(ValueError, match="unknown metric"):
        ProbeSettings(metrics=("nope",))
    with pytest.raises(ValueError, match="must be one of metrics"):
        ProbeSettings(metrics=("hoyer",), score_metric="gini")


def test_result_round_trips_through_json() -> None:
    result = ProbeResult(
        n_tokens=7,
        score=0.25,
        metrics={10: {"hoyer": 0.5, "effective_rank": 0.2}},
        metrics_mean={10: {"hoyer": 0.4, "effective_rank": 0.3}},
        truncated=True,
        percentile=0.9,
        states={"L10.last": (0.5, -1.25, 3.0)},
    )
    assert ProbeResult.from_dict(result.to_dict()) == result


def test_fingerprint_names_the_dtype_without_torch() -> None:
    fp = probe_fingerprint(
        ProbeSettings(), n_layers=30, hidden_size=576, dtype="float32", score_layer=10
    )
    assert fp["dtype"] == "float32"
    assert fp["code_version"] == PROBE_VERSION
    assert fp["layer"] == 10


def test_feature_name_grammar() -> None:
    assert feature_name(10, "top10_energy", "last") == "L10.top10_energy.last"
    assert parse_feature("L10.top10_energy.last") == (10, "top10_energy", "last")
    with pytest.raises(ValueError, match="must look like"):
        parse_feature("L10.top10_energy.middle")
    assert state_block(30, "mean") == "L30.mean"
    assert parse_state_feature(state_feature(30, "mean", 17)) == (30, "mean", 17)
    assert parse_state_block("L30.state.last") == (30, "last")
    assert parse_state_block("L30.hoyer.last") is None
    assert expand_features(["log_tokens", "L2.state.last"], 2) == (
        "log_tokens",
        "L2.state.last.0",
        "L2.state.last.1",
    )


def test_feature_value_is_oriented() -> None:
    result = ProbeResult(n_tokens=3, score=0.0, metrics={4: {"effective_rank": 0.3}})
    assert feature_value(result, 4, "effective_rank", "last") == sparsity("effective_rank", 0.3)
    assert feature_value(result, 4, "effective_rank", "last") == pytest.approx(0.7)
    with pytest.raises(KeyError):
        feature_value(result, 4, "effective_rank", "mean")
