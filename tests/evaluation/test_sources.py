"""Outcome sources: column mappings, manifests, the three file families (RouteLLM CSV,
RouterBench CSV, RouterDC JSON) on hand-made files, and routers scored across sources."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from evaluation.outcomes import (
    OutcomeDataError,
    OutcomeSet,
    as_text,
    column_value,
    concat_outcomes,
    read_outcomes,
)
from evaluation.routing import QualityGap, evaluate_by_source, evaluate_transfer
from evaluation.sources import SourceSpec, load_manifest, parse_source, read_sources
from probes.feature_table import FeatureTable

MIXTRAL = "mistralai/Mixtral-8x7B-Instruct-v0.1"
GPT4 = "gpt-4-1106-preview"
MISTRAL_CHAT = "mistralai/mistral-7b-chat"
DC_SMALL = "mistralai/Mistral-7B-v0.1"
DC_LARGE = "meta-llama/Meta-Llama-3-8B"


# -- the column mapping -----------------------------------------------------------------------


def test_a_plain_path_has_no_mapping() -> None:
    assert parse_source("data/gsm8k.csv") == SourceSpec(Path("data/gsm8k.csv"))
    spec = parse_source("data/a:b.csv")  # a ':' not followed by KEY= stays in the path
    assert spec.path == Path("data/a:b.csv") and spec.label == "a:b"


def test_mapping_values_may_hold_slashes_dots_bars_and_colons() -> None:
    spec = parse_source(
        "runs/dc.v2/mmlu.json:prompt=question,small=scores.mistralai/Mistral-7B-v0.1,"
        "large=scores.meta-llama/Meta-Llama-3-8B,answer=gpt-4|model_response,"
        "name=routerdc:mmlu,group=mmlu"
    )
    assert spec.path == Path("runs/dc.v2/mmlu.json")
    assert spec.prompt == "question"
    assert spec.small == "scores.mistralai/Mistral-7B-v0.1"
    assert spec.large == "scores.meta-llama/Meta-Llama-3-8B"
    assert spec.answer == "gpt-4|model_response"
    assert (spec.label, spec.holdout) == ("routerdc:mmlu", "mmlu")
    # unset keys stay None (the command's columns); the name defaults to the stem
    bare = parse_source("x/routerbench.csv:small=mistralai/mistral-7b-chat")
    assert (bare.prompt, bare.large, bare.label, bare.holdout) == (
        None,
        None,
        "routerbench",
        "routerbench",
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("f.csv:colour=red", "unknown key 'colour'"),
        ("f.csv:small=a,smal=b", "unknown key 'smal'"),
        ("f.csv:small=a,small=b", "small= is given twice"),
        ("f.csv:small=,large=b", "small= has no value"),
        (":small=a", "no file before the ':'"),
    ],
)
def test_bad_mappings_say_what_to_fix(text: str, message: str) -> None:
    with pytest.raises(OutcomeDataError, match=message):
        parse_source(text)


# -- manifests --------------------------------------------------------------------------------


def test_manifest_paths_are_relative_to_its_folder(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.csv").write_text("prompt,s,l\nq,1,0\n", encoding="utf-8")
    (tmp_path / "skip.txt").write_text("q\n", encoding="utf-8")
    manifest = tmp_path / "sources.yaml"
    manifest.write_text(
        "sources:\n"
        "  - path: data/a.csv\n    small: s\n    large: l\n    name: first\n    sample: 5\n"
        "  - {path: data, small: s, large: l, group: g, exclude: skip.txt}\n",
        encoding="utf-8",
    )
    first, second = load_manifest(manifest)
    path = tmp_path / "data" / "a.csv"
    assert first == SourceSpec(path, small="s", large="l", name="first", sample=5)
    assert second.path == tmp_path / "data" and second.holdout == "g"
    assert second.exclude == tmp_path / "skip.txt"
    # a bare list in JSON works too
    as_json = tmp_path / "sources.json"
    as_json.write_text(json.dumps([{"path": "data/a.csv"}]), encoding="utf-8")
    assert load_manifest(as_json) == [SourceSpec(tmp_path / "data" / "a.csv")]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("sources:\n  - path: a.csv\n  - path: a.csv\n    small: 3\n", r"sources\[1\]\.small: "),
        ("sources:\n  - path: a.csv\n    colour: red\n", r"sources\[0\]\.colour: Extra inputs"),
        ("sources:\n  - small: s\n", r"sources\[0\]\.path: Field required"),
        ("sources:\n  - path: a.csv\n    sample: 1\n", r"sources\[0\]\.sample: "),
        ("sources:\n  - path: nope.csv\n", r"sources\[0\]\.path: .*nope.csv does not exist"),
        ("sources: []\n", r"sources\.yaml: sources: "),
        ("sources: [\n", "not valid YAML"),
    ],
)
def test_manifest_errors_name_the_file_and_the_entry(
    tmp_path: Path, body: str, message: str
) -> None:
    (tmp_path / "a.csv").write_text("prompt,s,l\nq,1,0\n", encoding="utf-8")
    manifest = tmp_path / "sources.yaml"
    manifest.write_text(body, encoding="utf-8")
    with pytest.raises(OutcomeDataError, match=message) as info:
        load_manifest(manifest)
    assert "sources.yaml" in str(info.value)


# -- the three file families ------------------------------------------------------------------


def write_routellm(path: Path) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        out = csv.writer(f)
        out.writerow(["prompt", MIXTRAL, GPT4, f"{MIXTRAL}_response"])
        out.writerow(["What is 2+2?", "True", "True", "4"])
        out.writerow(["Prove it.", "False", "True", "no"])
    return path


def write_routerbench(path: Path, long_prompt: str = "Question 2\nAnswer:") -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        out = csv.writer(f)
        out.writerow(
            [
                "sample_id",
                "prompt",
                MISTRAL_CHAT,
                GPT4,
                f"{MISTRAL_CHAT}|model_response",
                f"{MISTRAL_CHAT}|total_cost",
            ]
        )
        out.writerow(["a.1", "['Question 1\\nAnswer:']", "0", "1", "B", ""])
        out.writerow(["a.2", repr([long_prompt, "Follow-up?"]), "1", "1", "C", "0.0001"])
        out.writerow(["a.3", "[not a list literal", "1", "0", "['A']", "0.0002"])
    return path


def write_routerdc(path: Path) -> Path:
    rows = [
        {
            "question": "Capital of France?",
            "scores": {DC_SMALL: 1.0, DC_LARGE: 1.0},
            "cluster_id": 3,
        },
        {"question": "Integrate x^2.", "scores": {DC_SMALL: 0.0, DC_LARGE: 0.5}, "cluster_id": 1},
    ]
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def test_three_families_in_one_set(tmp_path: Path) -> None:
    long_prompt = "x" * 200_000  # over the csv module's default field limit
    specs = [
        parse_source(str(write_routellm(tmp_path / "mmlu_routellm.csv"))),
        parse_source(
            f"{write_routerbench(tmp_path / 'routerbench.csv', long_prompt)}:"
            f"small={MISTRAL_CHAT},name=routerbench-mmlu"
        ),
        parse_source(
            f"{write_routerdc(tmp_path / 'dc.json')}:prompt=question,small=scores.{DC_SMALL},"
            f"large=scores.{DC_LARGE},name=routerdc-mmlu"
        ),
    ]
    data = read_sources(specs)
    assert data.prompts == [
        "What is 2+2?",
        "Prove it.",
        "Question 1\nAnswer:",
        f"{long_prompt}\n\nFollow-up?",
        "[not a list literal",
        "Capital of France?",
        "Integrate x^2.",
    ]
    assert data.small.tolist() == [1, 0, 0, 1, 1, 1, 0]
    assert data.large.tolist() == [1, 1, 1, 1, 0, 1, 0.5]
    assert data.groups == ["mmlu_routellm"] * 2 + ["routerbench-mmlu"] * 3 + ["routerdc-mmlu"] * 2
    assert data.answers is None


def test_answers_per_source_and_list_literal_answers(tmp_path: Path) -> None:
    bench = write_routerbench(tmp_path / "rb.csv")
    spec = parse_source(f"{bench}:small={MISTRAL_CHAT},answer={MISTRAL_CHAT}|model_response")
    data = read_sources([spec])
    assert data.answers == ["B", "C", "A"]
    # mixing a source with answers and one without is refused
    routellm = parse_source(str(write_routellm(tmp_path / "r.csv")))
    with pytest.raises(OutcomeDataError, match="some outcome files have the small model's answer"):
        read_sources([spec, routellm])
    # ... unless --answer-column covers the other one
    both = read_sources([spec, routellm], answer=f"{MIXTRAL}_response")
    assert both.answers == ["B", "C", "A", "4", "no"]


def test_column_paths_and_list_literals() -> None:
    row = {"scores": {"a.b/c": 0.5, "x": {"y": 1}}, "v1.0": 2, "v1": {"0": 3}}
    assert column_value(row, "scores.a.b/c") == (True, 0.5)
    assert column_value(row, "scores.x.y") == (True, 1)
    assert column_value(row, "v1.0") == (True, 2)  # the whole key wins
    assert column_value(row, "scores.nope") == (False, None)
    assert as_text("['only']") == "only"
    assert as_text("['a', 'b']") == "a\n\nb"
    assert as_text(["a", "b"]) == "a\n\nb"
    assert as_text("[1, 2]") == "[1, 2]"
    assert as_text("[broken") == "[broken"
    assert as_text("plain") == "plain"


def test_json_files_must_hold_a_list(tmp_path: Path) -> None:
    path = tmp_path / "o.json"
    path.write_text(json.dumps({"question": "q"}), encoding="utf-8")
    with pytest.raises(OutcomeDataError, match="expected a JSON list of objects"):
        read_outcomes([path])
    path.write_text(json.dumps([{"prompt": "q", MIXTRAL: 1, GPT4: 0}, 3]), encoding="utf-8")
    with pytest.raises(OutcomeDataError, match=r"o\.json:2: item 2"):
        read_outcomes([path])
    dc = write_routerdc(tmp_path / "dc.json")
    with pytest.raises(OutcomeDataError, match=r"no column 'scores\.nope'.*scores\.MODEL"):
        read_outcomes([dc], prompt_col="question", small_col="scores.nope")


def test_concat_keeps_rows_in_order() -> None:
    a = OutcomeSet(["a"], np.ones(1), np.zeros(1), ["A"])
    b = OutcomeSet(["b", "c"], np.zeros(2), np.ones(2), ["B", "B"])
    both = concat_outcomes([a, b])
    assert both.prompts == ["a", "b", "c"] and both.groups == ["A", "B", "B"]
    assert both.large.tolist() == [0, 1, 1]


# -- scoring across sources -------------------------------------------------------------------


def _source(name: str, n: int, seed: int, *, gap: float = 0.3) -> tuple[OutcomeSet, np.ndarray]:
    """n prompts where feature f > 0 marks 'the large model does better'."""
    rng = np.random.default_rng(seed)
    f = rng.normal(size=n)
    helps = f > 0.3
    small = np.where(helps, 0.0, (rng.random(n) < 0.7).astype(float))
    large = np.where(helps, 1.0, small)
    # move the gap to about `gap` by flipping large-better rows to ties
    while large.mean() - small.mean() > gap:
        i = int(np.flatnonzero(large > small)[0])
        large[i] = small[i]
    return OutcomeSet([f"{name}{i}" for i in range(n)], small, large, [name] * n), f


def _table(f: np.ndarray) -> FeatureTable:
    n = f.shape[0]
    return FeatureTable(
        names=("L1.gini.last",),
        values=f.reshape(n, 1),
        n_tokens=np.full(n, 10.0),
        truncated=np.zeros(n, dtype=bool),
        nll=np.linspace(1.0, 2.0, n),
    )


def test_quality_gap_statuses() -> None:
    assert QualityGap(100, 0.5, 0.8, 0.02).status == "ok"
    assert QualityGap(100, 0.5, 0.539, 0.01).status == "unstable"  # under 5 points
    assert QualityGap(100, 0.5, 0.58, 0.05).status == "unstable"  # under 2 SE
    assert QualityGap(100, 0.6, 0.5, 0.02).status == "reversed"
    assert QualityGap(100, 0.6, 0.6, 0.02).status == "none"
    warning = QualityGap(100, 0.5, 0.539, 0.01).warning("routerdc-mmlu")
    assert warning is not None and "routerdc-mmlu: APGR unstable: gap 3.9 points" in warning
    worse = QualityGap(100, 0.6, 0.5, 0.02).warning("rb")
    assert worse is not None and "the large model is worse" in worse and "-10.0 points" in worse


def test_transfer_trains_on_one_set_and_scores_the_other() -> None:
    train, f_train = _source("tr", 200, 0)
    test, f_test = _source("te", 100, 1)
    data = concat_outcomes([train, test])
    f = np.concatenate([f_train, f_test])
    rows = np.arange(len(data)) < len(train)
    report = evaluate_transfer(data, _table(f), rows, features=("L1.gini.last",))
    assert report.mode == "transfer" and report.n == 100 and report.folds == 1
    by = {r.name: r for r in report.routers}
    assert len(by["sparsity LR"].apgr) == 1 and by["sparsity LR"].mean("auroc") > 0.9
    assert "trained on 200 prompts from tr, tested on 100 from te (no CV)" in report.table()
    numbers = report.numbers()
    assert numbers["n_train"] == 200 and numbers["trained_on"] == ["tr"]
    assert numbers["routers"]["sparsity LR"]["apgr"] > 0.8


def test_leave_one_source_out_with_groups_and_gap_warnings() -> None:
    parts = [
        _source("routellm-mmlu", 80, 0),
        _source("routerdc-mmlu", 80, 1),
        _source("gsm8k", 80, 2, gap=0.03),
    ]
    reversed_set, f_rev = _source("worse", 40, 3)
    small, large = reversed_set.large, reversed_set.small.copy()
    large[np.flatnonzero((small == 0) & (large == 0))[:4]] = 1.0  # a few where large helps
    reversed_set = OutcomeSet(reversed_set.prompts, small, large, reversed_set.groups)
    data = concat_outcomes([p for p, _ in parts] + [reversed_set])
    f = np.concatenate([x for _, x in parts] + [f_rev])
    holdout = {"routellm-mmlu": "mmlu", "routerdc-mmlu": "mmlu"}
    report = evaluate_by_source(data, _table(f), holdout=holdout, features=("L1.gini.last",))
    assert report.mode == "by-source" and report.folds == 4
    info = {s.name: s for s in report.splits}
    # holding out one MMLU source drops the other MMLU source from training too
    assert info["routellm-mmlu"].trained_on == ("gsm8k", "worse")
    assert info["routellm-mmlu"].n_train == 120
    assert info["gsm8k"].trained_on == ("routellm-mmlu", "routerdc-mmlu", "worse")
    assert info["gsm8k"].gap.status == "unstable" and info["worse"].gap.status == "reversed"
    warnings = report.warnings()
    assert len(warnings) == 2
    assert warnings[0].startswith("gsm8k: APGR unstable: gap ")
    assert warnings[1].startswith("worse: the large model is worse")
    text = report.table()
    lines = text.splitlines()
    sparsity = [line for line in lines if " sparsity LR " in f" {line} "]
    assert len(sparsity) == 5  # one per source and the mean
    assert "*" in next(line for line in lines if line.startswith("gsm8k"))
    worse_block = next(line for line in lines if line.startswith("worse"))
    assert worse_block.split()[2:5] == ["-", "-", "-"]  # APGR and CPTs undefined there
    assert "mean of 4" in text and "* gsm8k: APGR unstable" in text
    numbers = report.numbers()
    assert set(numbers["sources"]) == {"routellm-mmlu", "routerdc-mmlu", "gsm8k", "worse"}
    worse = numbers["sources"]["worse"]
    assert worse["apgr_status"] == "reversed" and worse["routers"]["oracle"]["apgr"] is None
    assert worse["routers"]["oracle"]["auroc"] > 0.9
    # the mean APGR is over the sources with a stable gap only
    by = {r.name: r for r in report.routers}
    stable = [by["oracle"].apgr[i] for i in (0, 1)]
    assert numbers["routers"]["oracle"]["apgr"] == pytest.approx(np.mean(stable))
    assert "| source | router | APGR |" in report.markdown()


def test_leave_one_source_out_needs_two_groups() -> None:
    a, fa = _source("a", 40, 0)
    b, fb = _source("b", 40, 1)
    data = concat_outcomes([a, b])
    table = _table(np.concatenate([fa, fb]))
    with pytest.raises(OutcomeDataError, match="at least two hold-out groups"):
        evaluate_by_source(data, table, holdout={"a": "g", "b": "g"}, features=("L1.gini.last",))


def test_rows_without_an_outcome_are_left_out_and_counted(tmp_path: Path) -> None:
    f = tmp_path / "bench.csv"
    f.write_text(
        "prompt,small,large\n\"['q1']\",1,1\n\"['q2']\",,\n\"['q3']\",0,1\n\"['q4']\",1, \n",
        encoding="utf-8",
    )
    data = read_sources([parse_source(f"{f}:small=small,large=large")])
    assert data.prompts == ["q1", "q3"]
    assert data.unscored == 2
    assert data.subset([1]).unscored == 2
