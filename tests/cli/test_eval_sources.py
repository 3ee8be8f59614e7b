"""``sparsity-router eval`` across sources, end to end on a tiny model: outcome files of three
families (RouteLLM CSV, RouterBench CSV, RouterDC JSON, all hand-made here) read with per-file
column mappings or a manifest, ``--train`` (fit on one set, score on another) and
``--by-source`` (leave one source out)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from cli.main import main
from tests.conftest import build_tiny_model

MIXTRAL = "mistralai/Mixtral-8x7B-Instruct-v0.1"
GPT4 = "gpt-4-1106-preview"
MISTRAL_CHAT = "mistralai/mistral-7b-chat"
DC_SMALL = "mistralai/Mistral-7B-v0.1"
DC_LARGE = "meta-llama/Meta-Llama-3-8B"
WORDS = "the quick brown fox jumps over lazy dog what is two plus four eggs bake".split()


def _rows(n: int, seed: int, *, large_worse: bool = False) -> list[tuple[str, bool, bool]]:
    """(prompt, small right, large right): the large model does better on the long prompts
    (or, with ``large_worse``, mostly worse)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randint(2, 30)
        text = f"s{seed} {i} " + " ".join(rng.choices(WORDS, k=k))
        helps = k > 15 and rng.random() < 0.8
        small = not helps and rng.random() < 0.6
        large = helps or rng.random() < 0.6
        if large_worse:
            small, large = large, small
        out.append((text, small, large))
    return out


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("families")
    routellm = folder / "gsm8k_responses.csv"
    with routellm.open("w", encoding="utf-8", newline="") as f:
        out = csv.writer(f)
        out.writerow(["prompt", MIXTRAL, GPT4])
        for text, s, la in _rows(36, 1):
            out.writerow([text, str(s), str(la)])
    routerbench = folder / "routerbench.csv"
    with routerbench.open("w", encoding="utf-8", newline="") as f:
        out = csv.writer(f)
        out.writerow(["prompt", MISTRAL_CHAT, GPT4, f"{GPT4}|total_cost"])
        for text, s, la in _rows(36, 2):
            out.writerow([repr([text]), int(s), int(la), ""])
    routerdc = folder / "routerdc.json"
    dc = [
        {"question": text, "scores": {DC_SMALL: float(s), DC_LARGE: float(la)}, "cluster_id": 0}
        for text, s, la in _rows(36, 3)
    ]
    routerdc.write_text(json.dumps(dc), encoding="utf-8")
    worse = folder / "worse.csv"
    with worse.open("w", encoding="utf-8", newline="") as f:
        out = csv.writer(f)
        out.writerow(["prompt", MIXTRAL, GPT4])
        for text, s, la in _rows(30, 4, large_worse=True):
            out.writerow([text, str(s), str(la)])
    return {"routellm": routellm, "routerbench": routerbench, "routerdc": routerdc, "worse": worse}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture(scope="module")
def narrow_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama, 16 wide: the probe LR's hidden-vector fits stay fast."""
    return build_tiny_model(tmp_path_factory.mktemp("narrow-llama"), hidden=16)


@pytest.fixture
def tiny(narrow_model_dir: Path, cache: Path) -> list[str]:
    return [
        "--model",
        str(narrow_model_dir),
        "--device",
        "cpu",
        "--layer=-1",
        "--no-embedding",
        "--features-cache",
        str(cache),
    ]


def bench(families: dict[str, Path]) -> str:
    return f"{families['routerbench']}:small={MISTRAL_CHAT},name=routerbench-gsm8k"


def dc(families: dict[str, Path]) -> str:
    return (
        f"{families['routerdc']}:prompt=question,small=scores.{DC_SMALL},"
        f"large=scores.{DC_LARGE},name=routerdc"
    )


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_train_on_two_families_test_on_the_third(
    tiny: list[str],
    families: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out_json = tmp_path / "transfer.json"
    args = ["eval", *tiny, "--train", str(families["routellm"]), bench(families)]
    args += ["--data", dc(families), "--json", str(out_json), "--plot", str(tmp_path / "c.png")]
    code, out, err = run(args, capsys)
    assert code == 0, err
    assert "trained on 72 prompts from gsm8k_responses, routerbench-gsm8k, tested on 36 " in out
    assert "from routerdc (no CV)" in out
    for name in ("random", "length", "sparsity LR", "probe LR", "probe LR + kNN", "oracle"):
        assert f"\n{name} " in out
    numbers = json.loads(out_json.read_text())
    assert numbers["mode"] == "transfer" and numbers["n"] == 36 and numbers["n_train"] == 72
    assert numbers["trained_on"] == ["gsm8k_responses", "routerbench-gsm8k"]
    assert numbers["tested_on"] == "routerdc"
    assert len(numbers["routers"]["probe LR"]["apgr_folds"]) == 1
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_by_source_with_a_manifest_and_groups(
    tiny: list[str],
    families: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    manifest = tmp_path / "sources.yaml"
    manifest.write_text(
        f"- path: {families['routellm']}\n  group: gsm8k\n"
        f"- path: {families['routerbench']}\n  small: {MISTRAL_CHAT}\n  name: routerbench-gsm8k\n"
        "  group: gsm8k\n"
        f"- path: {families['routerdc']}\n  prompt: question\n  small: scores.{DC_SMALL}\n"
        f"  large: scores.{DC_LARGE}\n  name: routerdc\n",
        encoding="utf-8",
    )
    out_json = tmp_path / "loso.json"
    args = ["eval", *tiny, "--sources", str(manifest), "--data", str(families["worse"])]
    code, out, err = run([*args, "--by-source", "--json", str(out_json)], capsys)
    assert code == 0, err
    assert "138 prompts from 4 sources, leave one source out" in out
    lines = out.splitlines()
    assert any(line.startswith("routerdc ") for line in lines)
    assert any(line.startswith("mean of 4 ") for line in lines)
    assert "warning: worse: the large model is worse than the small one" in err
    worse_row = next(line for line in lines if line.startswith("worse "))
    assert worse_row.split()[2:5] == ["-", "-", "-"]
    numbers = json.loads(out_json.read_text())
    assert numbers["mode"] == "by-source" and numbers["folds"] == 4
    sources = numbers["sources"]
    assert set(sources) == {"gsm8k_responses", "routerbench-gsm8k", "routerdc", "worse"}
    # the two GSM8K sources share a group: holding one out drops the other from training
    assert sorted(sources["gsm8k_responses"]["trained_on"]) == ["routerdc", "worse"]
    assert sources["routerdc"]["n_train"] == 102
    assert sources["worse"]["apgr_status"] == "reversed"
    assert sources["worse"]["routers"]["probe LR"]["apgr"] is None
    assert sources["routerdc"]["routers"]["probe LR"]["auroc"] is not None
    assert set(numbers["routers"]["probe LR + kNN"]) >= {"apgr", "cpt50", "auroc"}


def test_eval_source_errors(
    tiny: list[str],
    families: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    one = ["eval", *tiny, "--data", str(families["routellm"])]
    code, _, err = run([*one, "--by-source"], capsys)
    assert code == 2 and "at least two hold-out groups" in err and "Traceback" not in err
    code, _, err = run([*one, "--by-source", "--train", str(families["worse"])], capsys)
    assert code == 2 and "--train and --by-source exclude each other" in err
    code, _, err = run([*one, "--data", f"{families['routerdc']}:small=scores.nope"], capsys)
    assert code == 2 and "no column 'question'" not in err and "'prompt'" in err
    code, _, err = run(["eval", *tiny], capsys)
    assert code == 2 and "give --data FILE or --sources FILE" in err
    twins = [f"{families['routellm']}:name=same", f"{families['worse']}:name=same"]
    code, _, err = run(
        ["eval", *tiny, "--data", twins[0], "--data", twins[1], "--by-source"], capsys
    )
    assert code == 2 and "two sources are named 'same'" in err
    bad = tmp_path / "sources.yaml"
    bad.write_text(f"- path: {families['routellm']}\n  smal: x\n", encoding="utf-8")
    code, _, err = run(["eval", *tiny, "--sources", str(bad)], capsys)
    assert code == 2 and "sources.yaml: sources[0].smal: Extra inputs are not permitted" in err
