"""The sparsity-router command line, driven through main([...])."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def tiny(tiny_model_dir: Path) -> list[str]:
    """Probe options selecting the tiny test model on CPU."""
    return ["--model", str(tiny_model_dir), "--device", "cpu", "--layer=-1"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    words = "the quick brown fox jumps over lazy dog what is two plus four eggs bake".split()
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("ref") / "reference.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(90):
            text = " ".join(rng.choices(words, k=rng.randint(1, 50)))
            handle.write(json.dumps({"prompt": text}) + "\n")
    return path


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# -- probe -----------------------------------------------------------------------------------


def test_probe_json(tiny: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        ["probe", *tiny, "--json", "--layers=1,-1", "--token-mean", "hello", "What is 2+2?"],
        capsys,
    )
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [d["input"] for d in lines] == [0, 1]
    for d in lines:
        assert {"n_tokens", "score", "percentile", "metrics", "metrics_mean", "truncated"} <= set(d)
        assert d["percentile"] is None
        assert set(d["metrics"]) == {"L1", "L4"}
        assert d["metrics"]["L4"]["top10_energy"] == pytest.approx(d["score"])
        assert d["truncated"] is False
        assert d["n_tokens"] > 0


def test_probe_table(tiny: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    long_text = "a very long prompt about foxes and dogs " * 5
    code, out, _ = run(
        ["probe", *tiny, "--layers=1,2,-1", "--max-tokens", "16", "hi there", long_text], capsys
    )
    assert code == 0
    lines = out.splitlines()
    header = lines[1].split()
    assert header == ["#", "input", "tokens", "score", "L1", "L2", "L4"]
    assert "hi there" in lines[2]
    assert "…" in lines[3]  # preview cut to 40 characters
    assert "16*" in lines[3]  # truncated marker
    assert lines[-1].startswith("* truncated")
    assert max(len(line) for line in lines[1:4]) < 100


def test_probe_file_with_calibration(
    tiny: list[str], reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    calib = tmp_path / "calib.json"
    fit = ["calibrate", *tiny, "--reference", str(reference), "--out", str(calib)]
    code, _, err = run([*fit, "--min-per-bucket", "30"], capsys)
    assert code == 0, err
    prompts = tmp_path / "prompts.csv"
    prompts.write_text('id,question\n1,"what is two plus two"\n2,the lazy dog\n')
    base = ["probe", *tiny, "--file", str(prompts), "--column", "question", "--calibration"]
    code, out, err = run([*base, str(calib), "--json"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 2
    assert all(0.0 <= r["percentile"] <= 1.0 for r in rows)
    code, out, _ = run([*base, str(calib)], capsys)
    assert code == 0
    assert out.splitlines()[1].split()[:5] == ["#", "input", "tokens", "score", "pct"]


def test_probe_mismatched_calibration(
    tiny: list[str], reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    calib = tmp_path / "calib.json"
    fit = ["calibrate", *tiny, "--reference", str(reference), "--out", str(calib)]
    assert main([*fit, "--min-per-bucket", "90"]) == 0
    capsys.readouterr()
    code, out, err = run(
        ["probe", *tiny, "--layer", "2", "--metric", "hoyer", "--calibration", str(calib), "hi"],
        capsys,
    )
    assert code == 2
    assert out == ""
    assert err.startswith("error: calibration ")
    assert (
        "was fitted with layer=4, metric=top10_energy; this probe has layer=2, metric=hoyer. "
        "Fix: re-run sparsity-router calibrate with this probe config"
    ) in err
    assert "Traceback" not in err


def test_calibrate_writes_json_and_png(
    tiny: list[str], reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_json, out_png = tmp_path / "c.json", tmp_path / "c.png"
    fit = ["calibrate", *tiny, "--reference", str(reference), "--out", str(out_json)]
    extra = ["--plot", str(out_png), "--min-per-bucket", "20", "--max-buckets", "3"]
    code, out, err = run([*fit, *extra, "--layers=0,1,2,3,4", "--token-mean"], capsys)
    assert code == 0, err
    data = json.loads(out_json.read_text())
    assert data["kind"] == "sparsity-router-calibration"
    assert data["stats"]["n"] == 90
    assert 1 <= len(data["buckets"]) <= 3
    assert [p["layer"] for p in data["layers"]] == [0, 1, 2, 3, 4]
    assert out_png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "90 references" in out
    assert "length buckets" in out
    assert "p50=" in out
    assert f"wrote {out_png}" in out


def test_calibrate_too_few_references(
    tiny: list[str], reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fit = ["calibrate", *tiny, "--reference", str(reference), "--out", str(tmp_path / "c.json")]
    code, _, err = run([*fit, "--min-per-bucket", "200"], capsys)
    assert code == 2
    assert "only 90 reference result(s)" in err
    assert not (tmp_path / "c.json").exists()
    assert "--min-per-bucket" in err


# -- errors ----------------------------------------------------------------------------------


def test_empty_text(tiny: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["probe", *tiny, "fine", "   "], capsys)
    assert code == 2
    assert err == (
        "error: input 1 (argument 2) is empty: there is nothing to probe. "
        "Fix: pass non-empty text\n"
    )


def test_nothing_to_probe(tiny: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["probe", *tiny], capsys)
    assert code == 2
    assert err.startswith("error: nothing to probe")


def test_layer_beyond_depth(tiny: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["probe", *tiny, "--layers=1,9", "hello"], capsys)
    assert code == 2
    assert err.startswith("error: layer 9 is out of range")
    assert "0..4" in err
    assert "-4..-1" in err


def test_missing_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = tmp_path / "no-such-model"
    code, _, err = run(["probe", "--model", str(missing), "hello"], capsys)
    assert code == 2
    assert err.startswith("error: probe model ")
    assert str(missing) in err
    assert "Traceback" not in err


def test_bad_input_file(
    tiny: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "p.txt"
    path.write_bytes(b"fine\n\xff bad\n")
    code, _, err = run(["probe", *tiny, "--file", str(path)], capsys)
    assert code == 2
    assert err.startswith(f"error: {path}:2: not valid UTF-8")


def test_invalid_probe_option(tiny: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["probe", *tiny, "--metric", "sparsest", "hi"], capsys)
    assert code == 2
    assert err.startswith("error: invalid probe options: --metric: unknown metric 'sparsest'")


def test_missing_calibration_file(
    tiny: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["probe", *tiny, "--calibration", str(tmp_path / "c.json"), "hi"], capsys)
    assert code == 2
    assert "does not exist" in err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["probe", "--layers", "x,y", "hi"],
        ["probe", "--batch-size", "0", "hi"],
        ["calibrate"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(argv, capsys)
    assert code == 2
    assert "usage:" in err


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    assert "probe" in out and "calibrate" in out


def test_module_help_in_a_subprocess() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "probe", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--calibration" in proc.stdout
    assert "--max-tokens" in proc.stdout


def test_importing_the_cli_loads_no_torch() -> None:
    code = "import sys, cli.main; sys.exit('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60, check=False)
    assert proc.returncode == 0


# -- the real model --------------------------------------------------------------------------


@pytest.mark.slow
def test_probe_with_the_bundled_model(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    texts = ["What is 2+2?", "Write a sonnet about the thermodynamics of black holes."]
    code, out, err = run(["probe", "--device", "cpu", "--json", "--layers=8,-1", *texts], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert set(row["metrics"]) == {"L8", "L30"}
        assert 0.0 < row["score"] < 1.0
        assert row["metrics"]["L30"]["top10_energy"] == pytest.approx(row["score"])
