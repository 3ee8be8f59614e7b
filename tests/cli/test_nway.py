"""``calibrate --labels F --models a,b,c --cost ...`` and ``eval-nway`` end to end, on the tiny
model and a hand-made RouterDC-style file (no benchmark data folder needed)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from cli.main import main
from probes.calibration import Calibration

MODELS = ("org/long-lover", "org/short-lover", "org/steady")


@pytest.fixture
def tiny(tiny_model_dir: Path) -> list[str]:
    return ["--model", str(tiny_model_dir), "--device", "cpu", "--layer=-1"]


@pytest.fixture(scope="module")
def routerdc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 prompts: one model is right on long ones, one on short ones, one half the time."""
    words = "the quick brown fox jumps over lazy dog what is two plus four eggs bake".split()
    rng = random.Random(3)
    rows = []
    for i in range(40):
        k = rng.randint(2, 40)
        long = k > 20
        rows.append(
            {
                "question": f"{i} " + " ".join(rng.choices(words, k=k)),
                "scores": {MODELS[0]: int(long), MODELS[1]: int(not long), MODELS[2]: 0.5},
            }
        )
    path = tmp_path_factory.mktemp("nway") / "toy_train.json"
    path.write_text(json.dumps(rows))
    return path


def run_cli(command: str, tiny: list[str], data: Path, tmp_path: Path, *options: list[str]) -> int:
    """``command`` on ``data`` (``--labels`` / ``--data``) with a private feature cache."""
    flag = "--labels" if command == "calibrate" else "--data"
    cache = ["--features-cache", str(tmp_path / "cache")]
    return main([command, *tiny, flag, str(data), *cache, *(o for opts in options for o in opts)])


def test_calibrate_models_writes_an_nway_section(
    tiny: list[str], routerdc: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "nway.json"
    costs = f"{MODELS[0]}=0.2,{MODELS[1]}=1.5,{MODELS[2]}=0.1"
    code = run_cli(
        "calibrate",
        tiny,
        routerdc,
        tmp_path,
        ["--models", ",".join(MODELS), "--cost", costs, "--min-per-bucket", "10"],
        ["--features", "L4.gini.last,L4.top1_energy.mean", "--out", str(out)],
    )
    text, err = capsys.readouterr()
    assert code == 0, err
    assert "40 labelled prompts, 3 models" in text and "5-fold CV: argmax accuracy" in text
    calibration = Calibration.load(out)
    model = calibration.nway
    assert model is not None and calibration.supervised is None
    assert model.models == MODELS and model.n_train == 40
    assert model.features == ("L4.gini.last", "L4.top1_energy.mean", "log_tokens")
    assert model.costs == {MODELS[0]: 0.2, MODELS[1]: 1.5, MODELS[2]: 0.1}
    assert model.cost_unit == "usd_per_mtok"


def test_calibrate_models_errors(
    tiny: list[str], routerdc: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "x.json")
    labels = ["--labels", str(routerdc), "--out", out]
    assert main(["calibrate", *tiny, *labels, "--models", "a,b", "--cost", "a=1"]) == 2
    assert "no column 'scores.a'" in capsys.readouterr().err
    assert main(["calibrate", *tiny, "--out", out, "--models", ",".join(MODELS)]) == 2
    assert "give --labels FILE with each model's results" in capsys.readouterr().err
    assert main(["calibrate", *tiny, *labels, "--cost", "a=1"]) == 2
    assert "--cost and --cost-column need --models" in capsys.readouterr().err
    bad_cost = ["--models", ",".join(MODELS), "--cost", f"{MODELS[0]}=1"]
    assert main(["calibrate", *tiny, *labels, *bad_cost]) == 2
    assert "no cost for" in capsys.readouterr().err


def test_eval_nway(
    tiny: list[str], routerdc: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "r.json"
    code = run_cli(
        "eval-nway",
        tiny,
        routerdc,
        tmp_path,
        ["--features", "L4.gini.last", "--folds", "4"],
        ["--json", str(report)],
    )
    text, err = capsys.readouterr()
    assert code == 0, err
    assert "best single model:" in text and "argmax router" in text and "oracle" in text
    doc = json.loads(report.read_text())
    assert doc["n"] == 40 and doc["oracle"]["accuracy"] == 1.0
    assert doc["models"] == list(MODELS)
