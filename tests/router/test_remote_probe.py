"""RemoteProbe without a server: what it sends, what it checks, how it fails.

Its agreement with the local probe on a real vLLM server is tested in tests/e2e/test_vllm.py
(layer mode) and tests/e2e/test_vllm_features.py (feature mode).
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
import torch

from policies.schema import VllmProbeSettings
from probes.derived import derived_name, feature_model_name
from probes.feature_vector import feature_vector
from probes.metrics import compute_all
from probes.probe import SparsityProbe
from probes.served import FeatureLayout
from probes.types import ProbeSettings
from router.probing import ProbeService
from router.remote_probe import RemoteProbe, RemoteProbeError
from tests.router.conftest import closed_port_url


def _remote(model_dir: Path, layers: tuple[int, ...], max_tokens: int = 512) -> RemoteProbe:
    settings = ProbeSettings(model=str(model_dir), layers=layers, max_tokens=max_tokens)
    return RemoteProbe(settings, VllmProbeSettings(base_url="http://127.0.0.1:9/v1"))


def test_same_fingerprint_and_tokens_as_the_local_probe(tiny_model_dir: Path) -> None:
    settings = ProbeSettings(model=str(tiny_model_dir), layers=(-2,), device="cpu")
    local = SparsityProbe(settings)
    remote = RemoteProbe(settings, VllmProbeSettings(base_url="http://h/v1"))
    assert remote.fingerprint() == local.fingerprint()
    assert remote.score_layer == local.score_layer == 3 and remote.n_layers == 4
    assert remote.model_name == derived_name(tiny_model_dir, 3)
    for item in ("What is two plus two?", [{"role": "user", "content": "hello"}]):
        assert remote.encoder.encode(item) == local.encode(item)
    payload = remote._payload([5, 6, 7])
    assert payload["input"] == [5, 6, 7] and payload["model"] == remote.model_name


def test_result_is_the_metrics_of_the_vector(tiny_model_dir: Path) -> None:
    remote = _remote(tiny_model_dir, layers=(2,))
    vector = torch.linspace(-1, 3, 64) ** 3
    answer = {"data": [{"embedding": vector.tolist()}], "usage": {"prompt_tokens": 3}}
    result = remote._result([1, 2, 3], False, answer)
    want = {k: float(v) for k, v in compute_all(vector).items()}
    assert result.metrics == {2: want} and result.n_tokens == 3
    assert result.score == pytest.approx(want["top10_energy"])
    # Any positive scale (the server's unit-weight final norm) gives the same numbers.
    scaled = remote._result([1, 2, 3], False, {"data": [{"embedding": (vector * 7.5).tolist()}]})
    for name, value in want.items():
        assert scaled.metrics[2][name] == pytest.approx(value, abs=1e-6)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ({"data": []}, "unexpected embeddings answer"),
        ({"data": [{"embedding": [0.5] * 10}]}, "width 10, expected 64"),
        (
            {"data": [{"embedding": [0.5] * 64}], "usage": {"prompt_tokens": 4}},
            "counted 4 prompt tokens for the 3 sent",
        ),
    ],
)
def test_bad_answers_are_clear_errors(tiny_model_dir: Path, answer: object, message: str) -> None:
    with pytest.raises(RemoteProbeError, match=message):
        _remote(tiny_model_dir, layers=(2,))._result([1, 2, 3], False, answer)


def test_model_listing_checks(tiny_model_dir: Path) -> None:
    remote = _remote(tiny_model_dir, layers=(2,), max_tokens=512)
    name = remote.model_name
    remote._check_models({"data": [{"id": name, "max_model_len": 2048}]})
    with pytest.raises(RemoteProbeError, match=r"serves \['other'\].*--layer 2"):
        remote._check_models({"data": [{"id": "other"}]})
    with pytest.raises(RemoteProbeError, match="--max-model-len 512"):
        remote._check_models({"data": [{"id": name, "max_model_len": 256}]})


def test_server_down_is_a_probe_error_outcome(tiny_model_dir: Path) -> None:
    settings = ProbeSettings(model=str(tiny_model_dir), layers=(2,), device="cpu")
    remote = RemoteProbe(settings, VllmProbeSettings(base_url=closed_port_url(), timeout_s=2))
    service = ProbeService(remote, calibration=None, cache=None, timeout_s=5)

    async def run() -> tuple[str | None, bool]:
        try:
            outcome = await service.measure("hello")
            return outcome.error, outcome.result is None
        finally:
            await service.aclose()

    assert anyio.run(run) == ("model", True)


def test_feature_mode_unpacks_what_the_local_probe_reports(tiny_model_dir: Path) -> None:
    """Several layers, token means and vectors: the answer is one feature vector, unpacked into
    the local probe's result (here built from the local model's own hidden states)."""
    settings = ProbeSettings(
        model=str(tiny_model_dir),
        layers=(1, 2, -1),
        score_layer=2,
        token_mean=True,
        state_layers=(2,),
        device="cpu",
    )
    local = SparsityProbe(settings)
    remote = RemoteProbe(settings, VllmProbeSettings(base_url="http://h/v1"))
    layout = FeatureLayout.for_settings(settings, 4, 64)
    assert remote.layout == layout and remote.layers == (1, 2, 4)
    assert remote.model_name == feature_model_name(tiny_model_dir, layout)
    assert remote.fingerprint() == local.fingerprint()
    ids, _ = local.encode("What is two plus two?")
    states, _mask = local.hidden_states([ids])
    vector = feature_vector(layout, {k: v[0] for k, v in states.items()}).tolist()
    answer = {"data": [{"embedding": vector}], "usage": {"prompt_tokens": len(ids)}}
    got = remote._result(ids, False, answer)
    want = local.measure_one("What is two plus two?")
    assert got.score == pytest.approx(want.score, abs=1e-6)
    assert got.metrics_mean is not None and want.metrics_mean is not None
    for layer in (1, 2, 4):
        for name, value in want.metrics[layer].items():
            assert got.metrics[layer][name] == pytest.approx(value, abs=1e-6)
            assert got.metrics_mean[layer][name] == pytest.approx(
                want.metrics_mean[layer][name], abs=1e-6
            )
    assert got.states is not None and want.states is not None
    assert got.states.keys() == want.states.keys() == {"L2.last", "L2.mean"}
    with pytest.raises(RemoteProbeError, match=f"width 64, expected {layout.width}"):
        remote._result(ids, False, {"data": [{"embedding": [0.5] * 64}]})
    with pytest.raises(RemoteProbeError, match=r"features L1-2_4x7m-tm-S2 .*derive-probe"):
        remote._check_models({"data": [{"id": "other"}]})


def test_feature_mode_reads_the_embeddings_too(tiny_model_dir: Path) -> None:
    """Layer 0 (the embeddings), even as the score's layer: a feature, unlike in layer mode."""
    settings = ProbeSettings(model=str(tiny_model_dir), layers=(0, 2), score_layer=0)
    remote = RemoteProbe(settings, VllmProbeSettings(base_url="http://h/v1"))
    assert remote.score_layer == 0 and remote.layers == (0, 2)
    with pytest.raises(RemoteProbeError, match="only layer 0"):
        RemoteProbe(ProbeSettings(model=str(tiny_model_dir), layers=(0,)), remote.remote)
