"""A supervised calibration on the probe's hidden vectors (read by the regression, or compared
with the labelled prompts' by the neighbour vote), served by the gateway: the probe keeps the
vectors (probe.state_layers), p_large bands route, the header reports it; a probe that cannot feed
the model is refused at start-up with the YAML key to set."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from policies.loader import parse_settings
from policies.schema import Settings
from probes.calibration import Calibration
from probes.errors import CalibrationError
from probes.neighbours import NeighbourVote
from probes.probe import SparsityProbe
from probes.supervised import LENGTH_FEATURE, SupervisedModel
from router.app import create_app
from router.state import build_state
from tests.router.conftest import REFERENCE
from tests.servers import FakeUpstream, ServerThread

CONFIG = """
probe:
  model: "{model}"
  layers: [1]
  state_layers: {states}
  timeout_s: 10
calibration: {{path: "{calibration}"}}
backends:
  small: {{type: openai, base_urls: ["{small}"], model: small-served}}
  large: {{type: openai, base_urls: ["{large}"], model: large-served}}
policies:
  default:
    rules:
      - {{name: large-helps, when: {{p_large: {{min: 0.5}}}}, route: large}}
    default: small
    on_probe_error: small
"""


def gateway_settings(
    probe: SparsityProbe, states: str, calibration: Path, urls: tuple[str, str], base: Path
) -> Settings:
    text = CONFIG.format(
        model=probe.settings.model,
        states=states,
        calibration=calibration,
        small=urls[0],
        large=urls[1],
    )
    return parse_settings(text, source_name="gateway.yaml", base_dir=base)


@pytest.fixture
def state_calibration(tiny_probe: SparsityProbe, tmp_path: Path) -> tuple[Path, SupervisedModel]:
    """A calibration whose supervised model reads layer 4's last-token vector: "the large model
    does better" where one coordinate is above its median on the reference prompts."""
    probe = SparsityProbe(
        tiny_probe.settings.model_copy(update={"layers": (1,), "state_layers": (4,)}),
        loaded=tiny_probe.loaded,
    )
    results = probe.measure(REFERENCE)
    X = np.array([[*r.states["L4.last"], np.log(r.n_tokens)] for r in results])  # type: ignore[index]
    names = (*(f"L4.state.last.{i}" for i in range(X.shape[1] - 1)), LENGTH_FEATURE)
    y = X[:, 3] > np.median(X[:, 3])
    model = SupervisedModel.fit(X, y, names, l2=1.0)
    path = tmp_path / "states.json"
    Calibration.fit(results, probe.fingerprint(), min_per_bucket=16).model_copy(
        update={"supervised": model}
    ).save(path)
    return path, model


@pytest.fixture
def vote_calibration(tiny_probe: SparsityProbe, tmp_path: Path) -> tuple[Path, SupervisedModel]:
    """A calibration whose model stacks a neighbour vote on layer 2's token mean with a
    regression on length: the large model did better on reference prompts whose layer-2 vector
    has coordinate 5 above its median."""
    probe = SparsityProbe(
        tiny_probe.settings.model_copy(update={"layers": (1,), "state_layers": (2,)}),
        loaded=tiny_probe.loaded,
    )
    results = probe.measure(REFERENCE)
    vectors = np.array([r.states["L2.mean"] for r in results], dtype=np.float32)  # type: ignore[index]
    gains = (vectors[:, 5] > np.median(vectors[:, 5])).astype(float)
    vote = NeighbourVote.fit(vectors, gains, "L2.state.mean", k=3)
    X = np.log([[r.n_tokens] for r in results])
    model = SupervisedModel.fit(
        X,
        gains > 0,
        (LENGTH_FEATURE,),
        neighbours=vote,
        stack=(1.0, 8.0, -4.0),
        votes=vote.votes(vectors, exclude=np.arange(len(results))),
    )
    path = tmp_path / "vote.json"
    Calibration.fit(results, probe.fingerprint(), min_per_bucket=16).model_copy(
        update={"supervised": model}
    ).save(path)
    return path, model


@pytest.mark.parametrize(
    ("calibration", "states"),
    [("state_calibration", "[-1]"), ("vote_calibration", "[2]")],
)
def test_gateway_routes_on_p_large_from_hidden_vectors(
    tiny_probe: SparsityProbe,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    calibration: str,
    states: str,
) -> None:
    """p_large from the hidden vectors of layer 4 (-1) read by the regression, or from the vote
    of the nearest reference prompts at layer 2."""
    path, model = request.getfixturevalue(calibration)
    upstreams = {name: ServerThread(FakeUpstream(name=name)).start() for name in ("s", "l")}
    try:
        urls = (upstreams["s"].url + "/v1", upstreams["l"].url + "/v1")
        settings = gateway_settings(tiny_probe, states, path, urls, tmp_path)
        served = SparsityProbe(settings.probe.probe_settings(), loaded=tiny_probe.loaded)
        reference = SparsityProbe(served.settings, loaded=tiny_probe.loaded)
        gateway = ServerThread(create_app(settings, probe=served)).start()
        try:
            seen = set()
            for prompt in REFERENCE[:24]:
                r = httpx.post(
                    gateway.url + "/v1/chat/completions",
                    json={"model": "auto", "messages": [{"role": "user", "content": prompt}]},
                    timeout=30,
                )
                assert r.status_code == 200, r.text
                expected = model.predict(reference.measure_one(prompt))
                assert float(r.headers["x-router-p-large"]) == pytest.approx(expected, abs=2e-4)
                want = "large" if expected >= 0.5 else "small"
                assert r.headers["x-router-backend"] == want
                seen.add(want)
            assert seen == {"small", "large"}
        finally:
            gateway.stop()
    finally:
        for server in upstreams.values():
            server.stop()


@pytest.mark.parametrize(
    ("calibration", "states", "missing"),
    [("state_calibration", "[]", 4), ("vote_calibration", "[4]", 2)],
)
def test_a_probe_without_the_vectors_is_refused(
    tiny_probe: SparsityProbe,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    calibration: str,
    states: str,
    missing: int,
) -> None:
    """The regression's vectors (layer 4) or the vote's (layer 2) not kept: refused at start-up."""
    path, _ = request.getfixturevalue(calibration)
    urls = ("http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1")  # never reached
    settings = gateway_settings(tiny_probe, states, path, urls, tmp_path)
    probe = SparsityProbe(settings.probe.probe_settings(), loaded=tiny_probe.loaded)
    with pytest.raises(CalibrationError, match=rf"layers \[{missing}\].*set probe\.state_layers"):
        build_state(settings, probe=probe)


def test_the_vllm_probe_keeps_vectors_with_the_feature_probe(tmp_path: Path) -> None:
    """state_layers on a vLLM probe: the remote probe expects a feature server that returns
    them (tests/e2e/test_vllm_features.py runs one)."""
    text = """
probe:
  layers: [10]
  state_layers: [30]
  backend: vllm
  vllm: {base_url: "http://127.0.0.1:9/v1"}
backends:
  small: {type: openai, base_urls: ["http://127.0.0.1:9/v1"], model: m}
policies:
  default: {default: small, on_probe_error: small}
"""
    settings = parse_settings(text, source_name="gateway.yaml", base_dir=tmp_path)
    from router.remote_probe import RemoteProbe

    remote = RemoteProbe.from_section(settings.probe)
    assert remote.layout is not None and remote.state_layers == (30,)
    assert "-L10x7m-S30-" in remote.model_name
