"""``sparsity-router eval`` and ``calibrate --labels`` end to end, on a tiny model and hand-made
outcome files (no benchmark data folder needed)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest

from cli.main import main
from evaluation.recipes import answer_layer
from probes.calibration import Calibration
from probes.supervised import LENGTH_FEATURE

SMALL = "mistralai/Mixtral-8x7B-Instruct-v0.1"
LARGE = "gpt-4-1106-preview"


@pytest.fixture
def tiny(tiny_model_dir: Path) -> list[str]:
    return ["--model", str(tiny_model_dir), "--device", "cpu", "--layer=-1"]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 prompts in RouteLLM's layout: the large model does better on the long ones."""
    words = "the quick brown fox jumps over lazy dog what is two plus four eggs bake".split()
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("labels") / "outcomes.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        out = csv.writer(f)
        out.writerow(["prompt", SMALL, LARGE])
        for i in range(60):
            k = rng.randint(2, 40)
            text = f"{i} " + " ".join(rng.choices(words, k=k))
            large_helps = k > 20 and rng.random() < 0.8
            small_ok = not large_helps and rng.random() < 0.7
            out.writerow([text, str(small_ok), str(large_helps or rng.random() < 0.7)])
    return path


ANSWER = f"{SMALL}_response"


@pytest.fixture(scope="module")
def answered(outcomes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same rows with the small model's answer text (surrounding blanks to be stripped)."""
    words = "so the answer is then we add carry one two three".split()
    rng = random.Random(2)
    with outcomes.open(encoding="utf-8", newline="") as f:
        header, *rows = list(csv.reader(f))
    path = tmp_path_factory.mktemp("answered") / "outcomes.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        out = csv.writer(f)
        out.writerow([*header, ANSWER])
        for row in rows:
            out.writerow([*row, "\n " + " ".join(rng.choices(words, k=rng.randint(3, 12))) + " "])
    return path


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_end_to_end(
    tiny: list[str], outcomes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    args = [
        "eval",
        *tiny,
        "--data",
        str(outcomes),
        "--features-cache",
        str(cache),
        "--folds",
        "3",
        "--plot",
        str(tmp_path / "curves.png"),
        "--json",
        str(tmp_path / "eval.json"),
    ]
    code, out, err = run(args, capsys)
    assert code == 0, err
    for name in (
        "random",
        "length",
        "perplexity",
        "embedding LR",
        "sparsity LR",
        "probe LR",
        "probe LR + kNN",
        "oracle",
    ):
        assert name in out
    assert "configured (L4.top10_energy.last)" in out
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    numbers = json.loads((tmp_path / "eval.json").read_text())
    routers = numbers["routers"]
    assert numbers["n"] == 60 and numbers["folds"] == 3 and numbers["reads"] == "prompt"
    assert "small model's answer" not in out
    assert len(routers["sparsity LR"]["apgr_folds"]) == 3 and routers["sparsity LR"]["trained"]
    assert routers["probe LR"]["trained"] and len(routers["probe LR"]["apgr_folds"]) == 3
    assert routers["probe LR + kNN"]["trained"]
    # length was built to predict who does better; the oracle bounds everything
    assert routers["length"]["apgr"] > 0.6
    assert routers["oracle"]["apgr"] > max(r["apgr"] for k, r in routers.items() if k != "oracle")
    assert abs(routers["random"]["apgr"] - 0.5) < 0.1

    # a re-run reads every feature from the cache: same numbers, no new cache files
    files = sorted(p.name for p in cache.rglob("*.npz"))
    code, out2, err = run(args, capsys)
    assert "sparsity LR" in out2
    assert code == 0, err
    assert sorted(p.name for p in cache.rglob("*.npz")) == files
    assert json.loads((tmp_path / "eval.json").read_text()) == numbers


def test_eval_bad_column(
    tiny: list[str], outcomes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(
        ["eval", *tiny, "--data", str(outcomes), "--large-column", "gpt5", "--no-embedding"],
        capsys,
    )
    assert code == 2
    assert "no column 'gpt5'" in err and "--large-column" in err and "Traceback" not in err


def test_calibrate_labels_round_trip(
    tiny: list[str], outcomes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "calib.json"
    code, text, err = run(
        [
            "calibrate",
            *tiny,
            "--labels",
            str(outcomes),
            "--features-cache",
            str(tmp_path / "cache"),
            "--min-per-bucket",
            "10",
            "--layer=1",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    assert "supervised model:" in text and "CV APGR" in text
    calibration = Calibration.load(out)
    model = calibration.supervised
    assert model is not None
    assert model.n_train == 60 and model.features[-1] == "log_tokens"
    assert {f.split(".")[0] for f in model.features[:-1]} == {"L3", "L4"}
    # the default recipe reads the last layer's hidden vectors (64 wide in the tiny model)
    assert sum(f.startswith("L4.state.") for f in model.features) == 2 * 64
    # and stacks the vote of the nearest labelled prompts at layer 2 (40% of 4 layers)
    assert model.stack is not None and len(model.neighbours) == 1
    vote = model.neighbours[0]
    assert (vote.block, vote.n, vote.k) == ("L2.state.mean", 60, 50)
    assert "neighbour vote: L2.state.mean, mean gain of the 50 nearest of 60" in text
    assert "stacked as " in text and " x L2.state.mean vote" in text
    assert model.state_layers() == (2, 4)
    assert "apgr" in model.cv
    # the extra layers the model needs do not move the headline score
    assert calibration.fingerprint["layer"] == 1
    assert "layers: [1, 3, 4], score_layer: 1, token_mean: true, state_layers: [2, 4]" in text
    # the probe, asked for the layers the model needs, reports p_large with the calibration
    # (it keeps the hidden vectors the calibration's model reads without being asked)
    probe = ["probe", *tiny, "--layers=1,3,4", "--layer=1", "--token-mean"]
    probe += ["--calibration", str(out), "a short prompt"]
    probe.append("the quick brown fox jumps over the lazy dog " * 4)
    code, text, err = run([*probe, "--json"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in text.splitlines()]
    assert all(0.0 < r["p_large"] < 1.0 for r in rows)
    assert all(r["percentile"] is not None for r in rows)
    # the table shows the same p_large in its own column
    code, text, err = run(probe, capsys)
    assert code == 0, err
    header, *cells = text.splitlines()[1:4]
    assert header.split()[:6] == ["#", "input", "tokens", "score", "pct", "p_large"]
    for cell, row in zip(cells, rows, strict=True):  # p_large, then the 3 layer columns
        assert cell.split()[-4] == f"{row['p_large']:.3f}"


def test_calibrate_needs_reference_or_labels(
    tiny: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["calibrate", *tiny, "--out", str(tmp_path / "c.json")], capsys)
    assert code == 2 and "--reference FILE" in err and "--labels FILE" in err


@pytest.mark.parametrize(
    ("feature", "message"),
    [
        ("L2.gini", "must look like 'L<layer>.<metric>.<last|mean>'"),
        ("L9.gini.last", "outside 0..4"),
        ("L4.state.last.99", "hidden vectors have 64 coordinates (0..63)"),
        ("L9.state.mean", "outside 0..4"),
        ("L4.state.middle.1", "L<layer>.state.<last|mean>.<index>"),
    ],
)
def test_calibrate_bad_feature(
    tiny: list[str],
    outcomes: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    feature: str,
    message: str,
) -> None:
    out = tmp_path / "c.json"
    args = ["calibrate", *tiny, "--labels", str(outcomes), "--out", str(out)]
    code, _, err = run([*args, "--features", feature], capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists()


def test_calibrate_labels_without_neighbours(
    tiny: list[str], outcomes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "calib.json"
    args = ["calibrate", *tiny, "--labels", str(outcomes), "--min-per-bucket", "10"]
    code, text, err = run([*args, "--neighbours", "none", "--out", str(out)], capsys)
    assert code == 0, err
    model = Calibration.load(out).supervised
    assert model is not None and model.neighbours == () and model.stack is None
    assert model.state_layers() == (4,) and "neighbour vote" not in text
    # another block and k
    args += ["--neighbours-k", "7", "--out", str(out)]
    code, text, err = run([*args, "--neighbours", "L3.state.last"], capsys)
    assert code == 0, err
    model = Calibration.load(out).supervised
    assert model is not None and model.vote_blocks() == ("L3.state.last",)
    assert model.neighbours[0].k == 7 and model.state_layers() == (3, 4)
    # two votes, each stacked with its own weight, both layers kept by the serving probe
    code, text, err = run([*args, "--neighbours", "L1.state.mean, L3.state.last"], capsys)
    assert code == 0, err
    model = Calibration.load(out).supervised
    assert model is not None and model.vote_blocks() == ("L1.state.mean", "L3.state.last")
    assert model.stack is not None and len(model.stack) == 4
    assert model.state_layers() == (1, 3, 4) and "state_layers: [1, 3, 4]" in text
    assert text.count("neighbour vote: ") == 2
    assert " x L1.state.mean vote + " in text and " x L3.state.last vote" in text


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--neighbours", "L2.gini.mean"], "must name a hidden vector, 'L<layer>.state."),
        (["--neighbours", "twelve"], "must name a hidden vector"),
        (["--neighbours", "L9.state.mean"], "outside 0..4"),
        (["--neighbours", "L2.state.mean,L2.gini.mean"], "'L2.gini.mean' must name a hidden"),
        (["--neighbours", "L2.state.mean,L2.state.mean"], "names L2.state.mean twice"),
        (["--neighbours-k", "60"], "--neighbours-k 60: only 60 labelled prompts"),
    ],
)
def test_calibrate_bad_neighbours(
    tiny: list[str],
    outcomes: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    option: list[str],
    message: str,
) -> None:
    out = tmp_path / "c.json"
    args = ["calibrate", *tiny, "--labels", str(outcomes), "--out", str(out), *option]
    code, _, err = run(args, capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists()


def test_eval_with_answers_probes_prompt_and_answer(
    tiny: list[str], answered: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli.main import build_parser
    from cli.options import build_probe, read_labels
    from evaluation.tables import feature_table

    cache = tmp_path / "cache"
    args = ["eval", *tiny, "--data", str(answered), "--features-cache", str(cache)]
    args += ["--answer-column", ANSWER, "--folds", "3", "--no-embedding"]
    code, out, err = run([*args, "--json", str(tmp_path / "eval.json")], capsys)
    assert code == 0, err
    assert f"the probe reads each prompt plus the small model's answer ({ANSWER})" in out
    assert "cascade" in out and "probe LR + kNN" in out
    assert "more tokens of prompt + the small model's answer -> large" in out
    numbers = json.loads((tmp_path / "eval.json").read_text())
    assert numbers["reads"] == "answer" and numbers["n"] == 60

    # what eval probed (and cached) is each prompt with its answer, not the prompt alone
    parsed = build_parser().parse_args(args)
    data = read_labels(parsed)
    probe = build_probe(parsed)
    files = sorted(p.name for p in cache.rglob("*.npz"))
    both = feature_table(probe, data.probe_inputs, cache, progress=False)
    assert sorted(p.name for p in cache.rglob("*.npz")) == files  # all from eval's cache
    alone = feature_table(probe, data.prompts, cache, progress=False)
    assert sorted(p.name for p in cache.rglob("*.npz")) != files  # new inputs: probed now
    assert (both.n_tokens > alone.n_tokens).all()
    assert not np.allclose(both.values, alone.values)


def test_calibrate_with_answers_is_a_cascade_check(
    tiny: list[str], answered: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = ["--features-cache", str(tmp_path / "cache")]
    out = tmp_path / "cascade.json"
    labels = ["--labels", str(answered), "--answer-column", ANSWER, *cache]
    args = ["calibrate", *tiny, *labels, "--min-per-bucket", "10", "--neighbours", "none"]
    code, text, err = run([*args, "--out", str(out)], capsys)
    assert code == 0, err
    assert "this calibration is for a policy's cascade (config key calibration.answer_path)" in text
    # the summary says so too
    assert "a cascade's check of that answer" in text and "cannot route prompts" in text
    calibration = Calibration.load(out)
    model = calibration.supervised
    assert model is not None and model.reads == "answer"
    assert json.loads(out.read_text())["supervised"]["reads"] == "answer"
    # the answer recipe: sparsity up to 40% of the depth and that layer's hidden vectors
    top = answer_layer(calibration.fingerprint["n_layers"])
    assert {f.split(".")[0] for f in model.features if f != LENGTH_FEATURE} == {
        f"L{la}" for la in range(min(2, top), top + 1)
    }
    assert model.state_layers() == (top,)

    # eval with it: only when the probe reads the answers too
    evaluate = ["eval", *tiny, "--data", str(answered), *cache, "--folds", "3", "--no-embedding"]
    code, _, err = run([*evaluate, "--calibration", str(out)], capsys)
    assert code == 2 and "Traceback" not in err
    assert "fitted on prompts plus the small model's answers" in err
    assert "Fix: give --answer-column NAME" in err
    code, text, err = run([*evaluate, "--calibration", str(out), "--answer-column", ANSWER], capsys)
    assert code == 0, err
    assert "configured (p_large)" in text

    # a file written before `reads` existed is a prompt router, refused for a cascade's eval
    legacy = json.loads(out.read_text())
    del legacy["supervised"]["reads"]
    old = tmp_path / "legacy.json"
    old.write_text(json.dumps(legacy), encoding="utf-8")
    loaded = Calibration.load(old).supervised
    assert loaded is not None and loaded.reads == "prompt"
    assert "cascade" not in Calibration.load(old).summary()
    code, _, err = run([*evaluate, "--calibration", str(old), "--answer-column", ANSWER], capsys)
    assert code == 2 and "fitted on prompts alone but --answer-column" in err
    assert "Fix: leave out --answer-column" in err
