"""N-way routing served by the gateway: a calibration's N-way model predicts three models'
quality from the probe's features, a ``best_of`` rule sends each request to the backend the
predictor picks; a calibration without an N-way model is refused at start-up, naming the rule."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from policies.loader import parse_settings
from policies.schema import Settings
from probes.calibration import Calibration
from probes.errors import CalibrationError
from probes.nway import NWayModel, pick
from probes.probe import SparsityProbe
from probes.supervised import LENGTH_FEATURE
from router.app import create_app
from router.state import build_state
from tests.router.conftest import REFERENCE
from tests.servers import FakeUpstream, ServerThread

FEATURES = ("L1.gini.last", LENGTH_FEATURE)

CONFIG = """
probe:
  model: "{model}"
  layers: [1]
  timeout_s: 10
calibration: {{path: "{calibration}"}}
backends:
  a: {{type: openai, base_urls: ["{a}"], model: model-a}}
  b: {{type: openai, base_urls: ["{b}"], model: model-b}}
  c: {{type: openai, base_urls: ["{c}"], model: model-c}}
policies:
  default:
    rules:
      - name: nway
        when: {{always: true}}
        route: {{best_of: [a, b, c], willingness_to_pay: 0.1}}
    default: a
    on_probe_error: a
"""


def settings_for(probe: SparsityProbe, calibration: Path, urls: list[str], base: Path) -> Settings:
    text = CONFIG.format(
        model=probe.settings.model, calibration=calibration, a=urls[0], b=urls[1], c=urls[2]
    )
    return parse_settings(text, source_name="gateway.yaml", base_dir=base)


def fit(tiny_probe: SparsityProbe, path: Path, *, nway: bool = True) -> NWayModel:
    """model-a is good on prompts with a high layer-1 Gini, model-b on the others, model-c
    middling everywhere but cheap."""
    probe = SparsityProbe(
        tiny_probe.settings.model_copy(update={"layers": (1,)}), loaded=tiny_probe.loaded
    )
    results = probe.measure(REFERENCE)
    X = np.array([[r.metrics[1]["gini"], np.log(r.n_tokens)] for r in results])
    high = (X[:, 0] > np.median(X[:, 0])).astype(float)
    Y = np.column_stack([high, 1.0 - high, np.full(len(high), 0.45)])
    model = NWayModel.fit(
        X, Y, FEATURES, ("model-a", "model-b", "model-c"), (1.0, 1.0, 0.2), l2=1.0
    )
    base = Calibration.fit(results, probe.fingerprint(), min_per_bucket=16)
    base.model_copy(update={"nway": model if nway else None}).save(path)
    return model


def test_requests_land_on_the_backend_the_predictor_picks(
    tiny_probe: SparsityProbe, tmp_path: Path
) -> None:
    model = fit(tiny_probe, tmp_path / "nway.json")
    upstreams = {n: ServerThread(FakeUpstream(name=n)).start() for n in ("a", "b", "c")}
    try:
        urls = [upstreams[n].url + "/v1" for n in ("a", "b", "c")]
        settings = settings_for(tiny_probe, tmp_path / "nway.json", urls, tmp_path)
        served = SparsityProbe(settings.probe.probe_settings(), loaded=tiny_probe.loaded)
        gateway = ServerThread(create_app(settings, probe=served)).start()
        try:
            seen = set()
            for prompt in REFERENCE[::3]:
                r = httpx.post(
                    gateway.url + "/v1/chat/completions",
                    json={"model": "auto", "messages": [{"role": "user", "content": prompt}]},
                    timeout=30,
                )
                assert r.status_code == 200, r.text
                predicted = model.predict(served.measure_one(prompt))
                backends = {"model-a": "a", "model-b": "b", "model-c": "c"}
                chosen = pick(predicted, model.costs, willingness_to_pay=0.1)
                want = backends[chosen]
                assert r.headers["x-router-backend"] == want
                quality = float(r.headers["x-router-predicted-quality"])
                assert quality == pytest.approx(predicted[chosen], abs=1e-4)
                assert r.headers["x-router-rule"] == "nway"
                seen.add(want)
            assert len(seen) >= 2  # the features decide, not a constant
        finally:
            gateway.stop()
    finally:
        for server in upstreams.values():
            server.stop()


def test_a_calibration_without_an_nway_model_is_refused(
    tiny_probe: SparsityProbe, tmp_path: Path
) -> None:
    fit(tiny_probe, tmp_path / "plain.json", nway=False)
    urls = ["http://127.0.0.1:9/v1"] * 3  # never reached
    settings = settings_for(tiny_probe, tmp_path / "plain.json", urls, tmp_path)
    probe = SparsityProbe(settings.probe.probe_settings(), loaded=tiny_probe.loaded)
    with pytest.raises(
        CalibrationError,
        match=r"policies\.default\.rules\[0\]\.route: best_of needs the calibration's N-way",
    ):
        build_state(settings, probe=probe)


def test_a_backend_whose_model_the_calibration_lacks_is_refused(
    tiny_probe: SparsityProbe, tmp_path: Path
) -> None:
    fit(tiny_probe, tmp_path / "nway.json")
    urls = ["http://127.0.0.1:9/v1"] * 3
    text = CONFIG.format(
        model=tiny_probe.settings.model,
        calibration=tmp_path / "nway.json",
        a=urls[0],
        b=urls[1],
        c=urls[2],
    ).replace("model: model-c", "model: model-z")
    settings = parse_settings(text, source_name="gateway.yaml", base_dir=tmp_path)
    probe = SparsityProbe(settings.probe.probe_settings(), loaded=tiny_probe.loaded)
    with pytest.raises(
        CalibrationError,
        match=r"policies\.default\.rules\[0\]\.route\.best_of\[2\]: backend 'c' serves model "
        r"'model-z'",
    ):
        build_state(settings, probe=probe)
