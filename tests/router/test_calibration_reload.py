"""Calibrations reload without a restart: ``POST /admin/reload`` re-reads the calibration file
(same path, new content), checks it against the probe before the swap, keeps the old one serving
when the new one is corrupt or fitted for another probe (422, counted), and requests running
during a swap all finish with one calibration or the other; ``learn --promote swap --gateway``
promotes a refit into it. A real gateway on a loopback port."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from cli.main import main
from policies.loader import load_settings
from probes.calibration import Calibration
from probes.probe import SparsityProbe
from router.app import create_app
from router.events import SQLiteSink
from tests.cli.test_learn import FIT, SWAP
from tests.evaluation.test_learning import label_records, length_calibration
from tests.router.conftest import REFERENCE, gateway_yaml
from tests.servers import FakeUpstream, ServerThread

Upstreams = dict[str, tuple[FakeUpstream, ServerThread]]


@pytest.fixture(scope="module")
def two_calibrations(
    tiny_probe: SparsityProbe, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """Two calibrations for the tiny probe with different content (and so different ids)."""
    results = tiny_probe.measure(REFERENCE)
    folder = tmp_path_factory.mktemp("calibrations")
    a = Calibration.fit(results, tiny_probe.fingerprint(), min_per_bucket=16)
    b = Calibration.fit(results[:40], tiny_probe.fingerprint(), min_per_bucket=10)
    return a.save(folder / "a.json"), b.save(folder / "b.json")


def _id(path: Path) -> str:
    return Calibration.load(path).id


def _ask(base: str, prompt: str = "What is two plus two?") -> httpx.Response:
    r = httpx.post(
        base + "/v1/chat/completions",
        json={"model": "auto", "messages": [{"role": "user", "content": prompt}]},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return r


def _reload(base: str) -> httpx.Response:
    return httpx.post(base + "/admin/reload", timeout=30)


def _metrics(base: str) -> str:
    return httpx.get(base + "/metrics", timeout=10).text


Start = Callable[[Path], tuple[ServerThread, Path]]


@pytest.fixture
def start(
    tiny_probe: SparsityProbe, tiny_model_dir: Path, upstreams: Upstreams, tmp_path: Path
) -> Start:
    """``start(first)``: a gateway reading ``tmp_path/serving.json`` (a copy of ``first``),
    built from the config file ``tmp_path/gw.yaml`` it reloads (started by ``with``)."""

    def make(first: Path) -> tuple[ServerThread, Path]:
        serving = tmp_path / "serving.json"
        shutil.copyfile(first, serving)
        config = tmp_path / "gw.yaml"
        config.write_text(gateway_yaml(tiny_model_dir, serving, upstreams))
        app = create_app(load_settings(config), probe=tiny_probe, config_path=config)
        return ServerThread(app), serving

    return make


def test_a_reload_swaps_the_calibration_behind_the_same_path(
    start: Start, two_calibrations: tuple[Path, Path]
) -> None:
    a, b = two_calibrations
    gw, serving = start(a)
    with gw:
        assert _ask(gw.url).headers["x-router-calibration"] == _id(a)
        assert f'sparsity_router_calibration_info{{id="{_id(a)}",kind="prompt"}} 1.0' in (
            _metrics(gw.url)
        )
        shutil.copyfile(b, serving)
        r = _reload(gw.url)
        assert r.status_code == 200, r.text
        assert r.json()["calibration"] == {"prompt": _id(b), "answer": None}
        assert f"prompt calibration {_id(b)} (was {_id(a)})" in r.json()["message"]
        assert _ask(gw.url).headers["x-router-calibration"] == _id(b)
        text = _metrics(gw.url)
        assert f'sparsity_router_calibration_info{{id="{_id(b)}",kind="prompt"}} 1.0' in text
        assert _id(a) not in text  # the old label set is gone


def test_a_broken_calibration_keeps_the_old_one_serving(
    start: Start, two_calibrations: tuple[Path, Path]
) -> None:
    a, _ = two_calibrations
    gw, serving = start(a)
    other_probe = json.loads(a.read_text())
    other_probe["fingerprint"]["max_tokens"] = 7
    with gw:
        for broken, reason in (
            ('{"kind": "sparsity-router-calibration", ', "is not valid JSON"),
            (json.dumps(other_probe), "max_tokens=7"),
            ('{"kind": "something else"}', "is not a sparsity-router calibration"),
        ):
            serving.write_text(broken)
            r = _reload(gw.url)
            assert r.status_code == 422, r.text
            error = r.json()["error"]
            assert error["code"] == "calibration_invalid"
            assert reason in error["message"] and str(serving) in error["message"]
            assert (
                f"still serving the previous config and calibration ({_id(a)})"
                in (error["message"])
            )
            assert _ask(gw.url).headers["x-router-calibration"] == _id(a)
        serving.unlink()
        assert _reload(gw.url).status_code == 422
        text = _metrics(gw.url)
        assert "sparsity_router_calibration_reload_failures_total 4.0" in text
        assert f'sparsity_router_calibration_info{{id="{_id(a)}",kind="prompt"}} 1.0' in text


def test_requests_during_swaps_all_finish_with_the_old_or_the_new_calibration(
    start: Start, two_calibrations: tuple[Path, Path]
) -> None:
    a, b = two_calibrations
    gw, serving = start(a)
    with gw, ThreadPoolExecutor(max_workers=6) as pool:
        futures = [pool.submit(_ask, gw.url, REFERENCE[i % len(REFERENCE)]) for i in range(90)]
        for source in (b, a, b):
            shutil.copyfile(source, serving)
            assert _reload(gw.url).status_code == 200
        seen = [f.result().headers["x-router-calibration"] for f in futures]
        assert set(seen) <= {_id(a), _id(b)}
        assert _ask(gw.url).headers["x-router-calibration"] == _id(b)


def test_learn_promotes_a_refit_into_a_running_gateway(
    tiny_probe: SparsityProbe, start: Start, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``learn --promote swap --gateway``: the refit beats the serving calibration on held-back
    labels, replaces its file, and the gateway's reload makes it answer."""
    backwards = length_calibration(tiny_probe, -1.0).save(tmp_path / "backwards.json")
    gw, serving = start(backwards)
    sink = SQLiteSink(tmp_path / "events.sqlite")
    sink.write(label_records(60))
    sink.close()
    out = tmp_path / "candidate.json"
    with gw:
        assert _ask(gw.url).headers["x-router-calibration"] == _id(backwards)
        args = ["learn", "--config", str(tmp_path / "gw.yaml"), "--out", str(out), *FIT, *SWAP]
        labels = ["--events", str(tmp_path / "events.sqlite")]
        cache = ["--features-cache", str(tmp_path / "features")]
        status = main([*args, *labels, *cache, "--gateway", gw.url])
        assert status == 0, capsys.readouterr()
        assert "gateway reloaded" in capsys.readouterr().out
        assert _id(serving) == _id(out)
        assert _ask(gw.url).headers["x-router-calibration"] == _id(out)


def test_the_openai_sdk_sees_the_calibration_on_plain_and_streamed_answers(
    start: Start, two_calibrations: tuple[Path, Path]
) -> None:
    """The official client reads x-router-calibration on both shapes, before and after a swap."""
    a, b = two_calibrations
    gw, serving = start(a)
    with gw:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", timeout=30)
        messages: list[Any] = [{"role": "user", "content": "What is two plus two?"}]
        for want, swap in ((_id(a), None), (_id(b), b)):
            if swap is not None:
                shutil.copyfile(swap, serving)
                assert _reload(gw.url).status_code == 200
            raw = client.chat.completions.with_raw_response.create(model="auto", messages=messages)
            assert raw.headers["x-router-calibration"] == want
            assert raw.parse().choices[0].message.content
            with client.chat.completions.with_streaming_response.create(
                model="auto", messages=messages, stream=True
            ) as stream:
                assert stream.headers["x-router-calibration"] == want
                text = "".join(
                    chunk.choices[0].delta.content or ""
                    for chunk in stream.parse()
                    if chunk.choices
                )
            assert text
