"""Routing evaluation on hand-made data: outcome files, folds, APGR/CPT of known routers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from evaluation.crossval import fold_ids
from evaluation.outcomes import OutcomeDataError, OutcomeSet, read_outcomes
from evaluation.recipes import (
    answer_features,
    default_recipe,
    neighbour_blocks,
    sparsity_features,
    supervised_features,
)
from evaluation.routing import evaluate
from evaluation.supervised import fit_supervised
from evaluation.tables import supervised_matrix
from probes.feature_table import FeatureTable

SMALL = "mistralai/Mixtral-8x7B-Instruct-v0.1"
LARGE = "gpt-4-1106-preview"
ROUTELLM_HEADER = f"prompt,{SMALL},{LARGE}\n"


def table_for(n_tokens: np.ndarray, values: np.ndarray, names: tuple[str, ...]) -> FeatureTable:
    n = n_tokens.shape[0]
    return FeatureTable(
        names=names,
        values=values.reshape(n, len(names)),
        n_tokens=n_tokens.astype(np.float64),
        truncated=np.zeros(n, dtype=bool),
        nll=np.linspace(1.0, 2.0, n),
    )


# -- outcome files ------------------------------------------------------------------------------


def test_routellm_layout_as_is(tmp_path: Path) -> None:
    folder = tmp_path / "mmlu"
    folder.mkdir()
    (folder / "mmlu_a.csv").write_text(
        ROUTELLM_HEADER + '"Q1\nA. x\nAnswer:",True,True\nQ2,False,True\nQ3,False,False\n',
        encoding="utf-8",
    )
    (folder / "mmlu_b.csv").write_text(ROUTELLM_HEADER + "Q4,True,False\n", encoding="utf-8")
    contaminated = folder / "contaminated_prompts.jsonl"
    contaminated.write_text(json.dumps({"eval_prompt": "Q3"}) + "\n", encoding="utf-8")
    data = read_outcomes([folder], exclude=contaminated)
    assert data.prompts == ["Q1\nA. x\nAnswer:", "Q2", "Q4"]
    assert data.small.tolist() == [1.0, 0.0, 1.0]
    assert data.large.tolist() == [1.0, 1.0, 0.0]
    assert data.groups == ["mmlu_a", "mmlu_a", "mmlu_b"]
    assert data.large_better.tolist() == [False, True, False]


def test_jsonl_with_named_columns_and_sample(tmp_path: Path) -> None:
    path = tmp_path / "o.jsonl"
    rows = [{"q": f"question {i}", "s": i % 2 == 0, "l": 0.5 + (i % 3) / 4} for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data = read_outcomes([path], prompt_col="q", small_col="s", large_col="l", sample=5, seed=3)
    assert len(data) == 5
    again = read_outcomes([path], prompt_col="q", small_col="s", large_col="l", sample=5, seed=3)
    assert data.prompts == again.prompts
    assert [int(p.split()[1]) for p in data.prompts] == sorted(
        int(p.split()[1]) for p in data.prompts
    )
    assert set(data.large.tolist()) <= {0.5, 0.75, 1.0}


def test_missing_column_names_what_exists(tmp_path: Path) -> None:
    path = tmp_path / "o.csv"
    path.write_text("prompt,small,large\nhi,True,False\n", encoding="utf-8")
    with pytest.raises(OutcomeDataError, match=r"no column 'mistralai/.*'small'.*--small-column"):
        read_outcomes([path])


def test_bad_value_names_file_row_and_column(tmp_path: Path) -> None:
    path = tmp_path / "o.csv"
    path.write_text("prompt,s,l\nhi,True,False\nho,maybe,True\n", encoding="utf-8")
    with pytest.raises(OutcomeDataError, match=r"o\.csv:3: column 's' holds 'maybe'"):
        read_outcomes([path], small_col="s", large_col="l")
    path.write_text("prompt,s,l\nhi,1.5,0\n", encoding="utf-8")
    with pytest.raises(OutcomeDataError, match=r"outside \[0, 1\]"):
        read_outcomes([path], small_col="s", large_col="l")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(OutcomeDataError, match="does not exist"):
        read_outcomes([tmp_path / "nope.csv"])


ANSWER = "mistralai/Mixtral-8x7B-Instruct-v0.1_response"


def test_answer_column_is_read_and_probed_as_a_conversation(tmp_path: Path) -> None:
    path = tmp_path / "gsm8k.csv"
    rows = [("Q1", "True", "True", " 4\n"), ("Q2", "False", "True", "five"), ("Q3", "1", "0", "x")]
    with path.open("w", encoding="utf-8", newline="") as f:
        out = csv.writer(f)
        out.writerow(["prompt", SMALL, LARGE, ANSWER])
        out.writerows(rows)
    contaminated = tmp_path / "contaminated.txt"
    contaminated.write_text("Q2\n", encoding="utf-8")
    data = read_outcomes([path], answer_col=ANSWER, exclude=contaminated)
    assert data.prompts == ["Q1", "Q3"] and data.answers == [" 4\n", "x"]
    assert data.probe_inputs == [
        [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "4"}],
        [{"role": "user", "content": "Q3"}, {"role": "assistant", "content": "x"}],
    ]
    picked = data.subset([1])
    assert picked.answers == ["x"] and picked.probe_inputs == data.probe_inputs[1:]
    # without the option the answers are not read, and the probe reads the prompts alone
    plain = read_outcomes([path])
    assert plain.answers is None and plain.probe_inputs == ["Q1", "Q2", "Q3"]
    assert plain.subset([0]).answers is None


def test_missing_answer_column_names_file_and_columns(tmp_path: Path) -> None:
    path = tmp_path / "o.csv"
    path.write_text(ROUTELLM_HEADER + "hi,True,False\n", encoding="utf-8")
    with pytest.raises(OutcomeDataError) as err:
        read_outcomes([path], answer_col="answer")
    message = str(err.value)
    assert f"{path}:2: no column 'answer'" in message
    assert "'prompt', 'mistralai/Mixtral-8x7B-Instruct-v0.1', 'gpt-4-1106-preview'" in message
    assert "--answer-column" in message


@pytest.mark.parametrize("cell", ["", "   "])
def test_empty_answer_names_file_and_row(tmp_path: Path, cell: str) -> None:
    path = tmp_path / "o.csv"
    path.write_text(
        ROUTELLM_HEADER.rstrip("\n") + ",answer\nQ1,True,False,ok\nQ2,True,True," + cell + "\n",
        encoding="utf-8",
    )
    with pytest.raises(OutcomeDataError, match=r"o\.csv:3: the answer in column 'answer' is empty"):
        read_outcomes([path], answer_col="answer")
    jsonl = tmp_path / "o.jsonl"
    jsonl.write_text(
        json.dumps({"prompt": "Q", SMALL: 1, LARGE: 0, "answer": None}) + "\n", encoding="utf-8"
    )
    with pytest.raises(OutcomeDataError, match=r"o\.jsonl:1: the answer in column 'answer'"):
        read_outcomes([jsonl], answer_col="answer")


# -- folds and metrics ----------------------------------------------------------------------------


def test_folds_are_stratified_by_outcome_pair() -> None:
    rng = np.random.default_rng(0)
    small = (rng.random(500) < 0.6).astype(float)
    large = (rng.random(500) < 0.8).astype(float)
    fold = fold_ids(small, large, 5, seed=0)
    assert sorted(np.unique(fold).tolist()) == [0, 1, 2, 3, 4]
    pair = 2 * small + large
    for v in np.unique(pair):
        counts = [int(((fold == k) & (pair == v)).sum()) for k in range(5)]
        assert max(counts) - min(counts) <= 1, (v, counts)


def _known_set(n_blocks: int = 40) -> tuple[OutcomeSet, np.ndarray]:
    """Blocks of 10 prompts: 3 large-only right, 1 small-only right, 4 both, 2 neither.

    q_small = 0.5, q_large = 0.7. The oracle sends the large-better prompts first, the ties
    after, the small-better ones last.
    """
    pattern = [(0, 1)] * 3 + [(1, 0)] + [(1, 1)] * 4 + [(0, 0)] * 2
    rows = pattern * n_blocks
    small = np.array([a for a, _ in rows], dtype=float)
    large = np.array([b for _, b in rows], dtype=float)
    data = OutcomeSet([f"p{i}" for i in range(len(rows))], small, large, ["g"] * len(rows))
    return data, large - small


def test_oracle_random_and_length_on_known_data() -> None:
    data, gain = _known_set()
    n = len(data)
    # The oracle's curve: 0.5 -> 0.8 over c in [0, 0.3], flat to 0.9, down to 0.7 at 1:
    # area = 0.3 * 0.65 + 0.6 * 0.8 + 0.1 * 0.75 = 0.75, APGR = (0.75 - 0.5) / 0.2 = 1.25
    expected_oracle = 1.25
    # a length feature that equals the gain: identical to the oracle
    names = ("L1.top1_energy.last", "L1.top1_energy.mean")
    values = np.column_stack([gain, -gain]).astype(np.float64)
    table = table_for(np.full(n, 10.0), values, names)
    report = evaluate(data, table, configured=("configured", gain), features=names, folds=5)
    by = {r.name: r for r in report.routers}
    assert by["oracle"].mean("apgr") == pytest.approx(expected_oracle, abs=1e-9)
    assert by["configured"].mean("apgr") == pytest.approx(expected_oracle, abs=1e-9)
    # q rises by 1 per unit share at first: 50% of the 0.2 gap at c = 0.1, 80% at c = 0.16
    assert by["oracle"].mean("cpt50") == pytest.approx(0.1, abs=1e-9)
    assert by["oracle"].mean("cpt80") == pytest.approx(0.16, abs=1e-9)
    assert by["oracle"].mean("auroc") == pytest.approx(1.0)
    # random is 0.5 in expectation; constant length ties everything: exactly 0.5
    assert by["random"].mean("apgr") == pytest.approx(0.5, abs=0.05)
    assert by["length"].mean("apgr") == pytest.approx(0.5, abs=1e-12)
    # the supervised router learns the separating feature out of fold
    assert by["sparsity LR"].mean("apgr") > 0.95 * expected_oracle
    assert by["sparsity LR"].trained and not by["length"].trained
    assert len(by["sparsity LR"].apgr) == 5
    assert "sparsity LR" in report.table() and "| oracle |" in report.markdown()


def test_reversed_router_mirrors() -> None:
    data, gain = _known_set()
    names = ("L1.gini.last",)
    table = table_for(np.arange(len(data)) + 1.0, gain[:, None], names)
    up = evaluate(data, table, configured=("up", gain), features=names, folds=4)
    down = evaluate(data, table, configured=("down", -gain), features=names, folds=4)
    a = next(r for r in up.routers if r.name == "up").mean("apgr")
    b = next(r for r in down.routers if r.name == "down").mean("apgr")
    assert a + b == pytest.approx(1.0)


def test_no_gap_is_an_error() -> None:
    data = OutcomeSet(["a", "b", "c", "d"], np.ones(4), np.ones(4), ["g"] * 4)
    table = table_for(np.arange(4.0) + 1, np.zeros(4), ("L1.gini.last",))
    with pytest.raises(OutcomeDataError, match="equally good"):
        evaluate(data, table, features=("L1.gini.last",), folds=2)


def test_recipe_fits_the_model_depth() -> None:
    deep = supervised_features(30)
    shallow = supervised_features(4)
    assert all(int(f.split(".")[0][1:]) <= 4 for f in shallow) and shallow
    assert len(deep) >= len(shallow)
    assert all(f.split(".")[2] in ("last", "mean") for f in deep)


def test_recipe_adds_the_last_layers_hidden_vectors() -> None:
    recipe = supervised_features(4)
    assert recipe[-2:] == ("L4.state.last", "L4.state.mean")
    assert set(recipe[:-2]) == set(sparsity_features(4))


def test_probe_lr_reads_the_hidden_vectors() -> None:
    """Where the outcome lives in the probe's hidden vector and not in its sparsity, the default
    recipe ("probe LR") finds it and the sparsity-only router does not."""
    rng = np.random.default_rng(0)
    n, width = 600, 16
    last = rng.normal(size=(n, width)).astype(np.float32)
    small = (rng.random(n) < 0.6).astype(float)
    large = small.copy()
    helps = last[:, 5] > 0.8  # the large model does better exactly here
    small[helps], large[helps] = 0.0, 1.0
    data = OutcomeSet([f"p{i}" for i in range(n)], small, large, ["g"] * n)
    names = sparsity_features(4)
    table = table_for(
        rng.integers(5, 100, n).astype(np.float64), rng.random((n, len(names))), names
    )
    table.states = {"L4.last": last, "L4.mean": rng.normal(size=(n, width)).astype(np.float32)}
    X, cols = supervised_matrix(table, supervised_features(4))
    assert X.shape == (n, len(names) + 2 * width + 1) and cols[len(names)] == "L4.state.last.0"
    report = evaluate(data, table, folds=5)
    by = {r.name: r for r in report.routers}
    assert by["probe LR"].trained and "hidden vectors" in by["probe LR"].note
    assert by["probe LR"].mean("auroc") > 0.95
    assert by["sparsity LR"].mean("auroc") < 0.65
    assert by["probe LR"].mean("apgr") > by["sparsity LR"].mean("apgr") + 0.2
    # without the vectors in the table, only the sparsity router runs
    table.states = {}
    assert "probe LR" not in {r.name for r in evaluate(data, table, folds=5).routers}
    with pytest.raises(KeyError, match=r"no L4\.last hidden vectors"):
        supervised_matrix(table, supervised_features(4))


def xor_table(
    rng: np.random.Generator, n: int, depth: int, rules: dict[int, tuple[int, int]]
) -> tuple[OutcomeSet, FeatureTable]:
    """n prompts where the large model does better exactly where, for every layer of ``rules``,
    the XOR of two coordinates (i, j) of that layer's 4-wide token-mean vector holds; a table of
    a ``depth``-layer probe with noise features, noise last-layer vectors and those vectors."""
    width = 4
    means = {layer: rng.normal(size=(n, width)).astype(np.float32) for layer in rules}
    small = (rng.random(n) < 0.5).astype(float)
    large = small.copy()
    helps = np.ones(n, dtype=bool)
    for layer, (i, j) in rules.items():
        helps &= (means[layer][:, i] > 0) ^ (means[layer][:, j] > 0)
    small[helps], large[helps] = 0.0, 1.0
    data = OutcomeSet([f"p{i}" for i in range(n)], small, large, ["g"] * n)
    names = sparsity_features(depth)
    table = table_for(
        rng.integers(5, 100, n).astype(np.float64), rng.random((n, len(names))), names
    )
    table.states = {
        f"L{depth}.last": rng.normal(size=(n, width)).astype(np.float32),
        f"L{depth}.mean": rng.normal(size=(n, width)).astype(np.float32),
        **{f"L{layer}.mean": m for layer, m in means.items()},
    }
    return data, table


def test_the_neighbour_vote_finds_what_a_linear_model_cannot() -> None:
    """The large model does better on an XOR of two coordinates of layer 2's token mean (the
    default neighbour block of a 4-layer probe): the stacked router finds it, the regression on
    the same features cannot, and fit_supervised serves it as a calibrated probability."""
    rng = np.random.default_rng(1)
    n, width = 800, 4
    data, table = xor_table(rng, n, 4, {2: (0, 1)})
    assert neighbour_blocks(4) == ("L2.state.mean",)  # 40% and 60% of 4 layers: both layer 2
    # SmolLM2's 30 layers: layer 12; from 2,500 labelled prompts on also layer 18
    assert neighbour_blocks(30, 2499) == ("L12.state.mean",)
    assert (
        neighbour_blocks(30, 2500) == neighbour_blocks(30) == ("L12.state.mean", "L18.state.mean")
    )
    by = {r.name: r for r in evaluate(data, table, folds=5).routers}
    assert by["probe LR + kNN"].trained and "L2.state.mean" in by["probe LR + kNN"].note
    assert by["probe LR + kNN"].mean("auroc") > 0.85
    assert by["probe LR"].mean("auroc") < 0.65
    model = fit_supervised(table, data, supervised_features(4), neighbours=("L2.state.mean",), k=20)
    assert len(model.neighbours) == 1
    assert model.neighbours[0].n == n and model.neighbours[0].k == 20
    assert model.state_layers() == (2, 4)
    assert model.cv["folds"] == 5.0
    assert model.cv["apgr"] > 0.9 * by["oracle"].mean("apgr") > by["probe LR"].mean("apgr") + 0.1
    X, _ = supervised_matrix(table, supervised_features(4))
    fresh = rng.normal(size=(200, width)).astype(np.float32)
    p = model.predict_matrix(X[:200], {"L2.mean": fresh, "L4.last": table.states["L4.last"][:200]})
    truth = (fresh[:, 0] > 0) ^ (fresh[:, 1] > 0)
    assert ((p > 0) & (p < 1)).all()
    assert p[truth].mean() > p[~truth].mean() + 0.4
    # without the block in the table: no stacked router in eval, a clear KeyError in fit
    del table.states["L2.mean"]
    assert "probe LR + kNN" not in {r.name for r in evaluate(data, table, folds=5).routers}
    with pytest.raises(KeyError, match=r"no L2\.mean hidden vectors"):
        fit_supervised(table, data, supervised_features(4), neighbours="L2.state.mean")


def test_two_votes_see_what_each_alone_cannot() -> None:
    """The large model does better where an XOR holds on layer 2's token mean AND another on
    layer 3's: each vote alone sees half the rule, the two stacked find it, and a block named
    twice is refused."""
    rng = np.random.default_rng(2)
    n, width = 1200, 4
    data, table = xor_table(rng, n, 4, {2: (0, 1), 3: (2, 3)})
    recipe = supervised_features(4)
    both = fit_supervised(table, data, recipe, neighbours=("L2.state.mean", "L3.state.mean"))
    assert both.vote_blocks() == ("L2.state.mean", "L3.state.mean")
    assert both.stack is not None and len(both.stack) == 4
    assert both.stack[1] > 0 and both.stack[2] > 0  # each vote pushes towards "large"
    single = [fit_supervised(table, data, recipe, neighbours=(b,)) for b in both.vote_blocks()]
    assert both.cv["auroc"] > max(m.cv["auroc"] for m in single) + 0.05
    X, _ = supervised_matrix(table, recipe)
    fresh = {k: rng.normal(size=(300, width)).astype(np.float32) for k in ("L2.mean", "L3.mean")}
    p = both.predict_matrix(X[:300], {**fresh, "L4.last": table.states["L4.last"][:300]})
    truth = ((fresh["L2.mean"][:, 0] > 0) ^ (fresh["L2.mean"][:, 1] > 0)) & (
        (fresh["L3.mean"][:, 2] > 0) ^ (fresh["L3.mean"][:, 3] > 0)
    )
    assert p[truth].mean() > p[~truth].mean() + 0.3
    with pytest.raises(ValueError, match="a neighbour block is named twice"):
        fit_supervised(table, data, recipe, neighbours=("L2.state.mean", "L2.state.mean"))


def test_eval_adds_the_second_vote_from_2500_labelled_prompts() -> None:
    """A 5-layer probe: eval's stacked router votes on layer 2 alone below 2,500 labelled
    prompts and on layers 2 and 3 from there on, where it then finds the rule spread over both."""
    rng = np.random.default_rng(3)
    n = 2500
    data, table = xor_table(rng, n, 5, {2: (0, 1), 3: (2, 3)})
    assert neighbour_blocks(5, n) == ("L2.state.mean", "L3.state.mean")
    by = {r.name: r for r in evaluate(data, table, folds=5).routers}
    assert "(L2.state.mean, L3.state.mean)" in by["probe LR + kNN"].note
    assert by["probe LR + kNN"].mean("auroc") > 0.8
    rows = np.arange(n - 1)
    less = FeatureTable(
        names=table.names,
        values=table.values[rows],
        n_tokens=table.n_tokens[rows],
        truncated=table.truncated[rows],
        nll=table.nll[rows],
        states={k: v[rows] for k, v in table.states.items()},
    )
    fewer = evaluate(data.subset(rows), less, folds=5).routers
    stacked = next(r for r in fewer if r.name == "probe LR + kNN")
    assert "(L2.state.mean)" in stacked.note
    assert stacked.mean("auroc") < by["probe LR + kNN"].mean("auroc") - 0.05


def test_the_answer_recipe_reads_the_first_40_percent_of_the_layers() -> None:
    answers = default_recipe(30, 14_037, answers=True)
    assert answers.features == answer_features(30)
    assert {f.split(".")[0] for f in answers.features} == {f"L{la}" for la in range(2, 13)}
    assert answers.features[-2:] == ("L12.state.last", "L12.state.mean")
    assert set(answers.sparsity) == set(answers.features[:-2]) and len(answers.sparsity) == 110
    assert answers.votes == ("L12.state.mean",)  # one vote, whatever the labels' size
    prompts = default_recipe(30, 14_037, answers=False)
    assert prompts.features == supervised_features(30)
    assert prompts.votes == ("L12.state.mean", "L18.state.mean")
    assert default_recipe(30, 1_000, answers=False).votes == ("L12.state.mean",)
    assert default_recipe(4, None, answers=True).features[-1] == "L2.state.mean"
