"""An experiment arm carrying its own calibration, through a real gateway on a loopback port:
each arm's requests are read with (and report) their arm's calibration, so one prompt is routed
differently per arm; /metrics and the event records name it; a broken arm calibration fails
start-up, and on reload answers 422 with the old state serving."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest

from evaluation.experiments import build_report, read_experiment_records, to_markdown
from policies.experiments import assign
from policies.loader import load_settings
from policies.schema import Settings
from probes.calibration import Calibration
from probes.errors import CalibrationError
from probes.probe import SparsityProbe
from router.app import create_app
from router.state import build_state
from tests.evaluation.test_learning import length_calibration
from tests.router.conftest import probe_yaml
from tests.servers import FakeUpstream, ServerThread

Upstreams = dict[str, tuple[FakeUpstream, ServerThread]]

#: A long prompt: P(large does better) is high by the rising calibration, low by the falling one.
LONG = " ".join(["word"] * 12) + " 3?"


def arm_yaml(tiny_model_dir: Path, upstreams: Upstreams, calibration: Path) -> str:
    small = upstreams["small"][1].url + "/v1"
    large = upstreams["large"][1].url + "/v1"
    return f"""
{probe_yaml(tiny_model_dir, calibration)}
backends:
  small: {{type: openai, base_urls: ["{small}"], model: small-served}}
  large: {{type: openai, base_urls: ["{large}"], model: large-served}}
policies:
  default:
    rules: [{{name: hard, when: {{p_large: {{min: 0.5}}}}, route: large}}]
    default: small
    on_probe_error: small
experiments:
  - name: ab
    model: auto
    key: user
    arms:
      - {{name: control, policy: default, weight: 0.5}}
      - {{name: challenger, policy: default, weight: 0.5, calibration: challenger.json}}
events: {{sink: sqlite, path: events.sqlite}}
"""


@pytest.fixture(scope="module")
def rising_falling(
    tiny_probe: SparsityProbe, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """P(large) rising with the prompt's length (the gateway's) and falling (the challenger's)."""
    folder = tmp_path_factory.mktemp("arm-calibrations")
    return (
        length_calibration(tiny_probe, 1.0).save(folder / "rising.json"),
        length_calibration(tiny_probe, -1.0).save(folder / "falling.json"),
    )


@pytest.fixture
def config(
    tiny_model_dir: Path, upstreams: Upstreams, rising_falling: tuple[Path, Path], tmp_path: Path
) -> Path:
    """``tmp_path/gw.yaml``: control reads rising.json, challenger ``tmp_path/challenger.json``
    (a copy of falling.json)."""
    rising, falling = rising_falling
    (tmp_path / "challenger.json").write_bytes(falling.read_bytes())
    path = tmp_path / "gw.yaml"
    path.write_text(arm_yaml(tiny_model_dir, upstreams, rising))
    return path


def users(settings: Settings) -> dict[str, str]:
    """A user hashed into each arm of the first experiment."""
    found: dict[str, str] = {}
    for i in range(200):
        found.setdefault(assign(settings.experiments[0], f"user-{i}").arm, f"user-{i}")
    return found


def ask(base: str, user: str, prompt: str = LONG) -> httpx.Response:
    body: dict[str, Any] = {
        "model": "auto",
        "user": user,
        "messages": [{"role": "user", "content": prompt}],
    }
    r = httpx.post(base + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r


def test_each_arm_is_routed_by_its_own_calibration(
    tiny_probe: SparsityProbe, config: Path, rising_falling: tuple[Path, Path], tmp_path: Path
) -> None:
    settings = load_settings(config)
    by_arm = users(settings)
    rising = Calibration.load(rising_falling[0]).id
    falling = Calibration.load(tmp_path / "challenger.json").id
    assert rising != falling
    gw = ServerThread(create_app(settings, probe=tiny_probe, config_path=config))
    with gw:
        control = ask(gw.url, by_arm["control"]).headers
        challenger = ask(gw.url, by_arm["challenger"]).headers
        again = ask(gw.url, by_arm["challenger"]).headers  # the cached raw result, recalibrated
        metrics = httpx.get(gw.url + "/metrics", timeout=10).text
        ids = [control["x-router-request-id"], challenger["x-router-request-id"]]
    assert (control["x-router-arm"], challenger["x-router-arm"]) == ("control", "challenger")
    assert control["x-router-calibration"] == rising
    assert challenger["x-router-calibration"] == again["x-router-calibration"] == falling
    assert float(control["x-router-p-large"]) > 0.5 > float(challenger["x-router-p-large"])
    assert (control["x-router-backend"], challenger["x-router-backend"]) == ("large", "small")
    assert (again["x-router-cache"], again["x-router-p-large"]) == (
        "hit",
        challenger["x-router-p-large"],
    )
    assert f'sparsity_router_calibration_info{{id="{rising}",kind="prompt"}} 1.0' in metrics
    assert f'sparsity_router_calibration_info{{id="{falling}",kind="arm:ab/challenger"}} 1.0' in (
        metrics
    )
    with sqlite3.connect(tmp_path / "events.sqlite") as db:
        rows = dict(db.execute("SELECT request_id, calibration FROM requests").fetchall())
    assert (rows[ids[0]], rows[ids[1]]) == (rising, falling)
    records, control_arm, order = read_experiment_records(config, "ab")
    report = build_report(records, "ab", control=control_arm, arm_order=order, resamples=10)
    assert [(s.arm, s.requests, s.calibrations) for s in report.arms] == [
        ("control", 1, {rising: 1}),
        ("challenger", 2, {falling: 2}),
    ]
    assert f"- challenger: {falling} 2" in to_markdown(report)


def test_a_broken_arm_calibration_fails_start_up_naming_the_arm_and_file(
    tiny_probe: SparsityProbe, config: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "challenger.json"
    broken.write_text('{"kind": "sparsity-router-calibration", ')
    with pytest.raises(CalibrationError) as info:
        build_state(load_settings(config), probe=tiny_probe)
    message = str(info.value)
    assert message.startswith("experiments[0].arms[1].calibration (arm ab/challenger): ")
    assert str(broken) in message and "is not valid JSON" in message


def test_a_broken_arm_calibration_on_reload_keeps_the_old_state_serving(
    tiny_probe: SparsityProbe, config: Path, tmp_path: Path
) -> None:
    settings = load_settings(config)
    challenger_user = users(settings)["challenger"]
    serving = Calibration.load(tmp_path / "challenger.json").id
    gw = ServerThread(create_app(settings, probe=tiny_probe, config_path=config))
    with gw:
        (tmp_path / "challenger.json").write_text('{"kind": "something else"}')
        r = httpx.post(gw.url + "/admin/reload", timeout=30)
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == "calibration_invalid"
        assert "experiments[0].arms[1].calibration (arm ab/challenger)" in error["message"]
        assert str(tmp_path / "challenger.json") in error["message"]
        assert "is not a sparsity-router calibration" in error["message"]
        assert "still serving the previous config" in error["message"]
        assert ask(gw.url, challenger_user).headers["x-router-calibration"] == serving
        metrics = httpx.get(gw.url + "/metrics", timeout=10).text
        assert "sparsity_router_calibration_reload_failures_total 1.0" in metrics
        # the arm removed from the config: its series goes with it on the next reload
        config.write_text(config.read_text().replace(", calibration: challenger.json", ""))
        assert httpx.post(gw.url + "/admin/reload", timeout=30).status_code == 200
        assert "arm:ab/challenger" not in httpx.get(gw.url + "/metrics", timeout=10).text
        assert ask(gw.url, challenger_user).headers["x-router-calibration"] != serving
