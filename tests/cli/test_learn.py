"""``sparsity-router learn``: labels from the gateway's events (a real SQLite sink) or a labels
file, the held-back comparison, ``--promote swap`` both ways (with the gateway's reload answered
200 or 422), and broken candidates refused."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from cli.learn import EXIT_NOT_PROMOTED
from cli.main import main
from policies.experiments import assign
from policies.loader import load_settings
from probes.calibration import Calibration
from probes.probe import SparsityProbe
from probes.supervised import LENGTH_FEATURE
from router.app import create_app
from router.events import SQLiteSink
from tests.evaluation.test_learning import label_records, length_calibration
from tests.servers import ServerThread

#: A fast fit (the length alone) and a swap judged on 30% of the labels.
FIT = ["--features", LENGTH_FEATURE, "--neighbours", "none", "--resamples", "300"]
SWAP = ["--holdout", "0.3", "--promote", "swap"]


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One feature cache for the module: the same labels are probed once."""
    return tmp_path_factory.mktemp("features")


@pytest.fixture
def tiny(tiny_model_dir: Path, features: Path) -> list[str]:
    """The tiny probe as the options give it (the fingerprint of conftest's tiny_probe)."""
    return [
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--layers=1,2,-1",
        "--token-mean",
        "--features-cache",
        str(features),
    ]


def events_file(path: Path, records: list[dict[str, Any]]) -> Path:
    sink = SQLiteSink(path)
    sink.write(records)
    sink.close()
    return path


class FakeGateway:
    """Answers ``POST /admin/reload`` with ``status`` and records the authorization header."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.calls: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http" and scope["path"] == "/admin/reload"
        self.calls.append(dict(scope["headers"]).get(b"authorization", b"").decode())
        body = (
            {"status": "reloaded", "message": "config reloaded"}
            if self.status == 200
            else {"error": {"message": "calibration is broken", "code": "calibration_invalid"}}
        )
        data = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": data})


@pytest.mark.parametrize("reload_status", [200, 422])
def test_learn_from_the_events_and_swap_the_serving_file(
    tiny_probe: SparsityProbe,
    tiny: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    reload_status: int,
) -> None:
    events = events_file(tmp_path / "events.sqlite", label_records(60))
    serving = length_calibration(tiny_probe, -1.0).save(tmp_path / "serving.json")
    old = Calibration.load(serving).id
    out = tmp_path / "candidate.json"
    gateway = FakeGateway(reload_status)
    with ServerThread(gateway, lifespan="off") as gw:
        args = ["learn", "--events", str(events), "--current", str(serving), "--out", str(out)]
        status = main([*args, *SWAP, "--gateway", gw.url, "--admin-key", "admin-k", *FIT, *tiny])
    printed = capsys.readouterr().out
    new = Calibration.load(out).id
    assert f"current ({old})" in printed and "APGR on the held-back labels" in printed
    assert "promoted:" in printed and "clears the margin" in printed
    assert gateway.calls == ["Bearer admin-k"]
    if reload_status == 200:
        assert status == 0 and "gateway reloaded" in printed
        assert Calibration.load(serving).id == new
    else:  # the gateway refused it: the previous file is put back
        assert status == 1 and "calibration is broken" in printed
        assert Calibration.load(serving).id == old


def test_learn_from_a_labels_file(
    tiny_probe: SparsityProbe, tiny: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "small", "large"])
        for record in label_records(60, chat=False):
            writer.writerow([record["input"], 1.0 - record["large_better"], record["large_better"]])
    out = tmp_path / "candidate.json"
    args = ["learn", "--labels", str(labels), "--small-column", "small", "--large-column"]
    status = main([*args, "large", "--out", str(out), *FIT, *tiny])
    assert status == 0
    printed = capsys.readouterr().out
    assert "current (configured (L4.top10_energy.last))" in printed  # the score alone
    model = Calibration.load(out, expect_fingerprint=tiny_probe.fingerprint()).supervised
    assert model is not None and model.n_train == 60


def test_a_candidate_that_does_not_beat_the_current_one_is_not_swapped(
    tiny_probe: SparsityProbe, tiny: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events = events_file(tmp_path / "events.sqlite", label_records(60))
    good = length_calibration(tiny_probe, 1.0)
    serving = good.save(tmp_path / "serving.json")
    candidate = good.save(tmp_path / "candidate.json")
    before = serving.read_bytes()
    args = ["learn", "--events", str(events), "--current", str(serving)]
    status = main([*args, "--candidate", str(candidate), "--promote", "swap", *tiny])
    assert status == EXIT_NOT_PROMOTED
    assert "not promoted: APGR difference +0.000" in capsys.readouterr().out
    assert serving.read_bytes() == before


def test_broken_candidates_and_too_few_labels_are_refused(
    tiny_probe: SparsityProbe, tiny: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events = events_file(tmp_path / "events.sqlite", label_records(60))
    serving = length_calibration(tiny_probe, 1.0).save(tmp_path / "serving.json")
    before = serving.read_bytes()
    candidate = tmp_path / "candidate.json"
    base = ["learn", "--events", str(events), "--current", str(serving), *tiny]

    def refused(path: Path, *more: str) -> str:
        assert main([*base, "--candidate", str(path), "--promote", "swap", *more]) == 2
        return capsys.readouterr().err

    candidate.write_text("{not json")
    assert "is not valid JSON" in refused(candidate)
    data = json.loads(serving.read_text())
    data["fingerprint"]["max_tokens"] = 7
    candidate.write_text(json.dumps(data))
    assert "was fitted with max_tokens=7" in refused(candidate)
    assert serving.read_bytes() == before

    few = events_file(tmp_path / "few.sqlite", label_records(20))
    out = str(tmp_path / "out.json")
    assert main(["learn", "--events", str(few), "--out", out, *tiny]) == 2
    assert "20 usable label(s): learn needs at least 50" in capsys.readouterr().err

    textless = [{**r, "input": None} for r in label_records(60)]
    blind = events_file(tmp_path / "blind.sqlite", textless)
    assert main(["learn", "--events", str(blind), "--out", out, *tiny]) == 2
    assert "labelling.store_text: true" in capsys.readouterr().err


#: A config routing on p_large (the candidate's arm must route on its calibration), with a
#: comment the experiment promotion keeps.
EXPERIMENT_CONFIG = """# the team's gateway
probe: {{model: "{model}", layers: [1, 2, -1], token_mean: true, device: cpu}}
calibration: {{path: serving.json}}
events: {{sink: sqlite, path: events.sqlite}}
backends:
  small: {{type: openai, base_urls: ["http://127.0.0.1:9/v1"]}}
  large: {{type: openai, base_urls: ["http://127.0.0.1:9/v1"]}}
policies:
  default:  # hard prompts to large
    rules: [{{name: hard, when: {{p_large: {{min: 0.5}}}}, route: large}}]
    default: small
    on_probe_error: small
"""


def experiment_config(tiny_probe: SparsityProbe, tiny_model_dir: Path, folder: Path) -> Path:
    """``folder/gw.yaml`` serving ``folder/serving.json`` (P(large) falling with length), with
    the labels of :func:`label_records` in its events file."""
    events_file(folder / "events.sqlite", label_records(60))
    length_calibration(tiny_probe, -1.0).save(folder / "serving.json")
    config = folder / "gw.yaml"
    config.write_text(EXPERIMENT_CONFIG.format(model=tiny_model_dir))
    return config


def test_promote_experiment_writes_a_config_with_the_challenger_arm(
    tiny_probe: SparsityProbe,
    tiny_model_dir: Path,
    features: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Labels, probe and current calibration from the config; the written config adds the
    experiment learn-<candidate id> (control: the gateway's calibration, challenger: the
    candidate) and loads; the config itself is left alone."""
    config = experiment_config(tiny_probe, tiny_model_dir, tmp_path)
    before = config.read_text()
    out = tmp_path / "candidate.json"
    cache = ["--features-cache", str(features)]
    args = ["learn", str(config), "--out", str(out), "--promote", "experiment", *FIT, *cache]
    status = main([*args, "--challenger-share", "0.25"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    candidate = Calibration.load(out).id
    name = f"learn-{candidate}"
    assert f"current ({Calibration.load(tmp_path / 'serving.json').id})" in printed
    written = tmp_path / "gw.experiment.yaml"
    assert f"sparsity-router experiments report {name} --config {written}" in printed
    assert config.read_text() == before
    text = written.read_text()
    assert text.startswith(before) and "# hard prompts to large" in text
    settings = load_settings(written)
    (experiment,) = settings.experiments
    assert (experiment.name, experiment.model, experiment.key) == (name, "auto", "user")
    control, challenger = experiment.arms
    assert (control.name, control.policy, control.weight, control.calibration) == (
        "control",
        "default",
        0.75,
        None,
    )
    assert (challenger.name, challenger.policy, challenger.weight) == (
        "challenger",
        "default",
        0.25,
    )
    assert challenger.calibration is not None
    assert settings.resolve_path(challenger.calibration) == out.resolve()
    assert experiment.control_arm.name == "control"


def test_promote_experiment_never_overwrites_the_config_and_replaces_its_own_experiment(
    tiny_probe: SparsityProbe,
    tiny_model_dir: Path,
    features: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = experiment_config(tiny_probe, tiny_model_dir, tmp_path)
    before = config.read_text()
    candidate = length_calibration(tiny_probe, 1.0).save(tmp_path / "candidate.json")
    name = f"learn-{Calibration.load(candidate).id}"
    cache = ["--features-cache", str(features)]
    promote = ["--candidate", str(candidate), "--promote", "experiment", *cache]
    assert main(["learn", str(config), *promote, "--write-config", str(config)]) == 2
    assert "which learn does not overwrite without --gateway" in capsys.readouterr().err
    assert config.read_text() == before
    written = tmp_path / "gw.experiment.yaml"
    assert main(["learn", str(config), *promote]) == 0
    again = tmp_path / "again.yaml"
    assert main(["learn", str(written), *promote, "--write-config", str(again)]) == 0
    assert f"replaced experiment {name}" in capsys.readouterr().out
    assert [e.name for e in load_settings(again).experiments] == [name]
    assert again.read_text() == written.read_text()


@pytest.mark.parametrize("reload_status", [200, 422])
def test_promote_experiment_into_a_running_gateway(
    tiny_probe: SparsityProbe,
    tiny_model_dir: Path,
    features: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    reload_status: int,
) -> None:
    """With --gateway, --config itself is replaced and the gateway reloaded: a user hashed into
    the challenger arm is read with the candidate (x-router-calibration), the others with the
    serving calibration. A refused reload puts the previous file back."""
    config = experiment_config(tiny_probe, tiny_model_dir, tmp_path)
    before = config.read_text()
    candidate = length_calibration(tiny_probe, 1.0).save(tmp_path / "candidate.json")
    args = ["learn", "--config", str(config), "--candidate", str(candidate)]
    promote = [*args, "--promote", "experiment", "--features-cache", str(features)]
    if reload_status == 422:  # a gateway that refuses it
        gateway = FakeGateway(422)
        with ServerThread(gateway, lifespan="off") as fake:
            assert main([*promote, "--gateway", fake.url, "--admin-key", "admin-k"]) == 1
        assert "calibration is broken" in capsys.readouterr().out
        assert config.read_text() == before and gateway.calls == ["Bearer admin-k"]
        return
    app = create_app(load_settings(config), probe=tiny_probe, config_path=config)
    with ServerThread(app) as gw:
        status = main([*promote, "--gateway", gw.url])
        printed = capsys.readouterr().out
        assert status == 0, printed
        assert "gateway reloaded" in printed
        settings = load_settings(config)
        (experiment,) = settings.experiments
        by_arm: dict[str, str] = {}
        for i in range(200):
            by_arm.setdefault(assign(experiment, f"user-{i}").arm, f"user-{i}")
        seen = {}
        for arm, user in by_arm.items():
            body = {"model": "auto", "user": user, "messages": [{"role": "user", "content": "Hi"}]}
            r = httpx.post(gw.url + "/v1/route", json=body, timeout=30)
            assert r.status_code == 200, r.text
            assert r.headers["x-router-arm"] == arm
            seen[arm] = r.headers["x-router-calibration"]
    assert seen == {
        "control": Calibration.load(tmp_path / "serving.json").id,
        "challenger": Calibration.load(candidate).id,
    }
    assert experiment.name == f"learn-{seen['challenger']}"
