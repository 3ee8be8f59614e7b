"""Routing on data a recipe was not chosen on: leave-one-source-out over three data families.

Run: ``.venv/bin/python bench/transfer.py [--data DIR] [--out bench/results/transfer.md]``

Ten sources (a benchmark x a small -> large model pair) from RouteLLM, RouterBench and RouterDC
(the list is :data:`SOURCES`; seeded samples where a set is large, so the whole run fits a 2-core
machine), each read through :mod:`evaluation.sources`, probed once through the ``eval`` feature
cache (every layer, both positions, perplexity, hidden vectors) and embedded with MiniLM (the
prompt's tail). Two questions, two protocols:

1. **Which recipe should a user fit on their own pair?** (the product: ``calibrate --labels`` on
   the user's data). Every candidate recipe is scored by stratified 5-fold CV *inside* each
   source; the recipe for a held-out source is the one with the best mean over the *other*
   sources, and its score on the held-out source is what the choice is worth there (nested
   leave-one-source-out: no number in the "chosen" column was used to choose it).
2. **Does a fitted router carry over?** Each trained router is fitted on every other source
   (sources of the same benchmark, e.g. MMLU from two families, are held out together) and
   scored on the held-out one, no refit: what a router fitted elsewhere is worth on new traffic.

Where the small model's answers are in the data (RouteLLM GSM8K, RouterBench), the same two
protocols compare the cascade recipes, which read the prompt and the small model's answer.
APGR is only stable when the pair's quality gap is: sources whose gap is under
:data:`evaluation.sources.MIN_GAP` are flagged. Writes the tables into ``--out`` between the
generated-section markers (the text around them is kept) and prints them.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    # numpy's OpenBLAS threads busy-wait for each other: on a loaded 2-core machine a
    # 300 x 1,262 product took 0.14 s with them and 2 ms without (docs/benchmarks.md)
    import os

    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from numpy.typing import NDArray

from bench._data import add_data_argument, data_root
from evaluation.baselines import embed_minilm
from evaluation.crossval import fold_ids, inner_fit, stack_weights
from evaluation.metrics import apgr, auroc, cpt
from evaluation.outcomes import OutcomeSet
from evaluation.recipes import (
    answer_features,
    answer_layer,
    neighbour_blocks,
    sparsity_features,
    supervised_features,
)
from evaluation.tables import block_vectors, supervised_matrix
from probes.feature_table import FeatureTable
from probes.neighbours import DEFAULT_K, NeighbourVote
from probes.supervised import fit_logistic

FloatArray = NDArray[np.float64]
Matrix = Callable[["Source", NDArray[np.int64]], FloatArray]

MIXTRAL = "mistralai/Mixtral-8x7B-Instruct-v0.1"
GPT4 = "gpt-4-1106-preview"
MISTRAL_CHAT = "mistralai/mistral-7b-chat"
DC_SMALL = "scores.mistralai/Mistral-7B-v0.1"

#: (name, group, file under --data, mapping, sample). RouterDC's large model is the set's best
#: single model of its seven (RouterDC's base Mistral-7B is the small one); RouterBench's pair is
#: Mistral-7B-chat -> GPT-4, RouteLLM's Mixtral -> GPT-4. Sources of one group (the same
#: benchmark) are held out together.
SOURCES: tuple[tuple[str, str, str, str, int | None], ...] = (
    (
        "routellm-mmlu",
        "mmlu",
        "routellm/mmlu",
        f"small={MIXTRAL},large={GPT4}",
        400,
    ),
    (
        "routellm-gsm8k",
        "gsm8k",
        "routellm/gsm8k/gsm8k_responses.csv",
        f"small={MIXTRAL},large={GPT4},answer={MIXTRAL}_response",
        500,
    ),
    (
        "routerbench-arc",
        "arc",
        "routerbench/arc_challenge_train.csv",
        f"small={MISTRAL_CHAT},large={GPT4},answer={MISTRAL_CHAT}|model_response",
        120,
    ),
    (
        "routerbench-winogrande",
        "winogrande",
        "routerbench/winograde_train.csv",
        f"small={MISTRAL_CHAT},large={GPT4},answer={MISTRAL_CHAT}|model_response",
        120,
    ),
    (
        "routerbench-mbpp",
        "mbpp",
        "routerbench/mbpp_train.csv",
        f"small={MISTRAL_CHAT},large={GPT4},answer={MISTRAL_CHAT}|model_response",
        None,
    ),
    (
        "routerdc-mmlu",
        "mmlu",
        "routerdc/mmlu_train.json",
        f"prompt=question,small={DC_SMALL},large=scores.HuggingFaceH4/zephyr-7b-beta",
        300,
    ),
    (
        "routerdc-gsm8k",
        "gsm8k",
        "routerdc/gsm8k-train.json",
        f"prompt=question,small={DC_SMALL},large=scores.meta-math/MetaMath-Mistral-7B",
        None,
    ),
    (
        "routerdc-arc",
        "arc",
        "routerdc/arc_challenge_train.json",
        f"prompt=question,small={DC_SMALL},large=scores.HuggingFaceH4/zephyr-7b-beta",
        None,
    ),
    (
        "routerdc-humaneval",
        "humaneval",
        "routerdc/humaneval_train.json",
        f"prompt=question,small={DC_SMALL},"
        "large=scores.cognitivecomputations/dolphin-2.9-llama3-8b",
        None,
    ),
    (
        "routerdc-cmmlu",
        "cmmlu",
        "routerdc/cmmlu_train.json",
        f"prompt=question,small={DC_SMALL},large=scores.HuggingFaceH4/zephyr-7b-beta",
        300,
    ),
)

DEPTH = 30  # the bundled SmolLM2-135M's layers
ANSWER_LAYER = answer_layer(DEPTH)
BEGIN = "<!-- generated by bench/transfer.py: begin -->"
END = "<!-- generated by bench/transfer.py: end -->"


@dataclass(slots=True)
class Source:
    name: str
    group: str
    family: str
    data: OutcomeSet
    table: FeatureTable
    emb: FloatArray
    answer_table: FeatureTable | None = None  # the probe reading prompt + the small model's answer
    extra: dict[str, FloatArray] = field(default_factory=dict)

    @property
    def gap(self) -> float:
        return float(self.data.large.mean() - self.data.small.mean())


@dataclass(frozen=True, slots=True)
class Router:
    """A router: fixed (a score read off the source) or trained (a design matrix, optionally
    stacked with nearest-neighbour votes on hidden-vector blocks)."""

    name: str
    reads: str  # "prompt" or "answer"
    matrix: Matrix | None = None
    score: Callable[[Source], FloatArray] | None = None
    votes: tuple[str, ...] = ()
    candidate: bool = True  # a probe recipe the LOSO choice may pick
    key: str = ""  # routers sharing a key share their regression (fitted once per split)

    @property
    def trained(self) -> bool:
        return self.matrix is not None


# -- design matrices -------------------------------------------------------------------------


def _probe(features: Sequence[str], *, answer: bool = False) -> Matrix:
    def build(src: Source, idx: NDArray[np.int64]) -> FloatArray:
        table = src.answer_table if answer else src.table
        assert table is not None
        return supervised_matrix(table, features)[0][idx]

    return build


def _embedding(src: Source, idx: NDArray[np.int64]) -> FloatArray:
    return src.emb[idx]


def _confidence(src: Source, idx: NDArray[np.int64]) -> FloatArray:
    """What the probe makes of the answer given the prompt: the answer's own mean NLL (the
    probe's surprise at it), its length, and how far reading it moved the probe's state and
    sparsity at the answer layer (prompt vs prompt + answer)."""
    return np.column_stack([src.extra[k][idx] for k in sorted(src.extra)])


def _joined(*parts: Matrix) -> Matrix:
    def build(src: Source, idx: NDArray[np.int64]) -> FloatArray:
        return np.column_stack([p(src, idx) for p in parts])

    return build


def answer_extras(src: Source) -> dict[str, FloatArray]:
    """:func:`_confidence`'s columns, from the prompt's and the prompt + answer's tables."""
    p, a = src.table, src.answer_table
    assert a is not None
    n_p, n_a = p.n_tokens.astype(np.float64), a.n_tokens.astype(np.float64)
    answer_tokens = np.maximum(n_a - n_p, 1.0)
    whole = ~(p.truncated | a.truncated)
    # mean NLL of the answer's tokens: total NLL of prompt + answer minus the prompt's (exact up
    # to the chat template's few tokens; where the tail window cut the prompt, the whole mean)
    answer_nll = np.where(whole, (a.nll * n_a - p.nll * n_p) / answer_tokens, a.nll)
    out = {
        "answer_nll": answer_nll,
        "answer_log_tokens": np.log(answer_tokens),
        "prompt_nll": p.nll,
    }
    for pos in ("last", "mean"):
        u = block_vectors(p, f"L{ANSWER_LAYER}.state.{pos}").astype(np.float64)
        v = block_vectors(a, f"L{ANSWER_LAYER}.state.{pos}").astype(np.float64)
        cos = (u * v).sum(1) / (np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1) + 1e-12)
        out[f"state_cos_{pos}"] = cos
    for metric in ("top1_energy", "effective_rank", "gini"):
        for pos in ("last", "mean"):
            name = f"L{ANSWER_LAYER}.{metric}.{pos}"
            out[f"shift_{name}"] = a.column(name) - p.column(name)
    return out


def routers() -> list[Router]:
    sparsity = sparsity_features(DEPTH)
    probe = supervised_features(DEPTH)
    all_layers = tuple(
        f"L{layer}.{m}.{pos}"
        for pos in ("last", "mean")
        for layer in range(1, DEPTH + 1)
        for m in ("top1_energy", "top10_energy", "effective_rank", "gini", "outlier_frac")
    )
    ans = answer_features(DEPTH)
    ans_sparsity = tuple(f for f in ans if ".state." not in f)
    vote = (f"L{ANSWER_LAYER}.state.mean",)
    return [
        Router("length", "prompt", score=lambda s: s.table.n_tokens.astype(np.float64)),
        Router("perplexity", "prompt", score=lambda s: s.table.nll),
        Router("embedding LR", "prompt", matrix=_embedding, candidate=False),
        Router("sparsity LR", "prompt", matrix=_probe(sparsity)),
        Router("sparsity LR, all layers", "prompt", matrix=_probe(all_layers)),
        Router("probe LR", "prompt", matrix=_probe(probe), key="probe"),
        Router(
            "probe LR + kNN",
            "prompt",
            matrix=_probe(probe),
            votes=neighbour_blocks(DEPTH, 1000),
            key="probe",
        ),
        Router("answer length", "answer", score=lambda s: s.extra["answer_log_tokens"]),
        Router("answer NLL", "answer", score=lambda s: s.extra["answer_nll"]),
        Router("answer sparsity LR", "answer", matrix=_probe(ans_sparsity, answer=True)),
        Router("answer confidence LR", "answer", matrix=_confidence),
        Router(
            "answer sparsity + confidence LR",
            "answer",
            matrix=_joined(_probe(ans_sparsity, answer=True), _confidence),
        ),
        Router("answer recipe LR", "answer", matrix=_probe(ans, answer=True), key="answer"),
        Router(
            "answer recipe + kNN",
            "answer",
            matrix=_probe(ans, answer=True),
            votes=vote,
            key="answer",
        ),
    ]


# -- fitting and scoring ---------------------------------------------------------------------


@dataclass(slots=True)
class Score:
    apgr: float
    cpt50: float
    auroc: float


def _metrics(s: FloatArray, small: FloatArray, large: FloatArray) -> Score:
    better = large > small
    return Score(
        apgr(s, small, large),
        cpt(s, small, large, 0.5),
        auroc(s, better) if 0 < better.sum() < better.size else math.nan,
    )


def _vectors(src: Source, router: Router, block: str) -> NDArray[np.float32]:
    table = src.answer_table if router.reads == "answer" else src.table
    assert table is not None
    return block_vectors(table, block)


_FITS: dict[
    tuple[str, str], tuple[float, FloatArray, FloatArray, float, FloatArray, FloatArray]
] = {}


def _fit_predict(
    router: Router,
    split: str,
    X: FloatArray,
    small: FloatArray,
    large: FloatArray,
    vectors: Sequence[NDArray[np.float32]],
    X_test: FloatArray,
    vectors_test: Sequence[NDArray[np.float32]],
) -> FloatArray:
    """Log-odds (or stacked P) of a trained router fitted on (X, small, large), on X_test."""
    y = large > small
    memo = (router.key or router.name, split)
    if memo not in _FITS:
        l2, oof = inner_fit(X, y, small, large)
        _FITS[memo] = (l2, oof, *fit_logistic(X, y, l2=l2))
    l2, oof, coef, b, mean, scale = _FITS[memo]
    z = ((X_test - mean) / scale) @ coef + b
    if not router.votes:
        return z
    gain = large - small
    votes = [
        NeighbourVote.fit(v, gain, blk, k=DEFAULT_K)
        for v, blk in zip(vectors, router.votes, strict=False)
    ]
    own = np.arange(len(y))
    loo = np.column_stack([vt.votes(v, exclude=own) for vt, v in zip(votes, vectors, strict=False)])
    *w, c = stack_weights(oof, loo, y)  # the stacking calibrate --labels fits
    test_votes = np.column_stack([vt.votes(v) for vt, v in zip(votes, vectors_test, strict=False)])
    return np.column_stack([z, test_votes]) @ np.array(w) + c


def within_source(src: Source, router: Router, folds: int = 5, seed: int = 0) -> Score:
    """Stratified k-fold CV inside one source (the user's own pair): mean over test folds."""
    d = src.data
    fold = fold_ids(d.small, d.large, folds, seed)
    all_idx = np.arange(len(d))
    scores: list[Score] = []
    X = router.matrix(src, all_idx) if router.matrix is not None else None
    vecs = [_vectors(src, router, b) for b in router.votes]
    for k in range(folds):
        tr, te = fold != k, fold == k
        if d.small[te].mean() == d.large[te].mean():
            continue
        if X is None:
            assert router.score is not None
            s = router.score(src)[te]
        else:
            s = _fit_predict(
                router,
                f"{src.name}/{k}",
                X[tr],
                d.small[tr],
                d.large[tr],
                [v[tr] for v in vecs],
                X[te],
                [v[te] for v in vecs],
            )
        scores.append(_metrics(s, d.small[te], d.large[te]))
    return Score(*(float(np.nanmean([getattr(x, f) for x in scores])) for f in Score.__slots__))


def across_sources(sources: Sequence[Source], held: Source, router: Router) -> Score:
    """Fitted on every source outside ``held``'s group, scored on ``held`` (no refit)."""
    if router.matrix is None:
        assert router.score is not None
        return _metrics(router.score(held), held.data.small, held.data.large)
    train = [s for s in sources if s.group != held.group and _reads(s, router)]
    Xs = [router.matrix(s, np.arange(len(s.data))) for s in train]
    small = np.concatenate([s.data.small for s in train])
    large = np.concatenate([s.data.large for s in train])
    vecs = [np.concatenate([_vectors(s, router, b) for s in train]) for b in router.votes]
    n = np.arange(len(held.data))
    s = _fit_predict(
        router,
        f"all but {held.group}",
        np.vstack(Xs),
        small,
        large,
        vecs,
        router.matrix(held, n),
        [_vectors(held, router, b) for b in router.votes],
    )
    return _metrics(s, held.data.small, held.data.large)


def _reads(src: Source, router: Router) -> bool:
    return router.reads == "prompt" or src.answer_table is not None


# -- loading ---------------------------------------------------------------------------------


def load_sources(root: Path, names: Sequence[str] | None) -> list[Source]:
    from evaluation.sources import parse_source, read_sources
    from evaluation.tables import feature_table
    from probes.probe import SparsityProbe
    from probes.types import ProbeSettings

    probe = SparsityProbe(ProbeSettings())
    out: list[Source] = []
    for name, group, rel, mapping, sample in SOURCES:
        if names and name not in names:
            continue
        t = time.monotonic()
        spec = replace(
            parse_source(f"{root / rel}:{mapping},name={name},group={group}"),
            exclude=root / rel / "contaminated_prompts.jsonl" if name == "routellm-mmlu" else None,
            sample=sample,
        )
        data = read_sources([spec], seed=0)
        prompt_only = OutcomeSet(data.prompts, data.small, data.large, data.groups)
        table = feature_table(probe, prompt_only.probe_inputs, None, progress=False)
        emb = embed_minilm(data.prompts)
        src = Source(name, group, name.split("-")[0], data, table, emb)
        if data.answers is not None:
            src.answer_table = feature_table(probe, data.probe_inputs, None, progress=False)
            src.extra = answer_extras(src)
        out.append(src)
        print(
            f"{name}: {len(data)} prompts, small {data.small.mean():.1%} -> large "
            f"{data.large.mean():.1%} ({time.monotonic() - t:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    return out


# -- the report ------------------------------------------------------------------------------


def _cell(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.3f}"


def _table(
    sources: Sequence[Source],
    rs: Sequence[Router],
    results: dict[tuple[str, str], Score],
    chosen: dict[str, str] | None,
    metric: str = "apgr",
) -> list[str]:
    head = "| router | " + " | ".join(s.name for s in sources) + " | mean |"
    lines = [head, "|---|" + "---|" * (len(sources) + 1)]
    for r in rs:
        vals = [getattr(results[(s.name, r.name)], metric) for s in sources]
        mean = float(np.nanmean(vals))
        lines.append(f"| {r.name} | " + " | ".join(map(_cell, vals)) + f" | {_cell(mean)} |")
    if chosen is not None:
        vals = [getattr(results[(s.name, chosen[s.name])], metric) for s in sources]
        lines.append(
            "| **recipe chosen on the other sources** | "
            + " | ".join(
                f"{_cell(v)} ({chosen[s.name]})" for v, s in zip(vals, sources, strict=False)
            )
            + f" | **{_cell(float(np.nanmean(vals)))}** |"
        )
    return lines


def loso_choice(
    sources: Sequence[Source], rs: Sequence[Router], results: dict[tuple[str, str], Score]
) -> dict[str, str]:
    """For each source, the candidate recipe with the best mean APGR over the other sources."""
    cands = [r for r in rs if r.trained and r.candidate]
    out = {}
    for held in sources:
        others = [s for s in sources if s.name != held.name]
        out[held.name] = max(
            cands, key=lambda r: float(np.nanmean([results[(s.name, r.name)].apgr for s in others]))
        ).name
    return out


def report(sources: Sequence[Source], seconds: float, command: str) -> str:
    rs = routers()
    lines = [
        BEGIN,
        "",
        f"Command: `{command}` ({seconds / 60:.0f} min on this 2-core machine, features cached).",
        "",
        "| source | family | group | prompts | small | large | gap (points) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in sources:
        flag = "" if abs(s.gap) >= 0.05 else " (small: APGR unstable)"
        lines.append(
            f"| {s.name} | {s.family} | {s.group} | {len(s.data)} | {s.data.small.mean():.1%} | "
            f"{s.data.large.mean():.1%} | {100 * s.gap:.1f}{flag} |"
        )
    for reads, title in (("prompt", "Prompt routers"), ("answer", "Cascade routers")):
        rr = [r for r in rs if r.reads == reads]
        ss = [s for s in sources if _reads(s, rr[0])]
        if not ss:
            continue
        within = {(s.name, r.name): within_source(s, r) for s in ss for r in rr}
        for s in ss:
            within[(s.name, "random")] = Score(0.5, math.nan, 0.5)
        chosen = loso_choice(ss, rr, within)
        print(f"{title}: within-source CV done", file=sys.stderr, flush=True)
        lines += [
            "",
            f"### {title}: fitted on each source's own pair (5-fold CV inside the source)",
            "",
            "APGR; the last row is the nested leave-one-source-out figure: for each source, the "
            "recipe with the best mean on the *other* sources, scored here.",
            "",
            *_table(ss, rr, within, chosen),
            "",
            "AUROC (score vs 'the large model does better'):",
            "",
            *_table(ss, rr, within, None, "auroc"),
        ]
        across = {(s.name, r.name): across_sources(ss, s, r) for s in ss for r in rr}
        print(f"{title}: across-source fits done", file=sys.stderr, flush=True)
        lines += [
            "",
            f"### {title}: fitted on the other sources, no refit (zero-shot transfer)",
            "",
            "APGR; trained on every source outside the held-out source's group.",
            "",
            *_table(ss, rr, across, None),
        ]
    lines += ["", END]
    return "\n".join(lines)


def write_report(out: Path, generated: str) -> None:
    text = out.read_text(encoding="utf-8") if out.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + generated + tail
    else:
        text = (text.rstrip() + "\n\n" if text else "# Routing across sources\n\n") + generated
    out.write_text(text.rstrip() + "\n", encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_argument(parser)
    parser.add_argument("--sources", nargs="*", help="only these sources (by name)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/transfer.md"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    sources = load_sources(data_root(args.data), args.sources)
    command = "python bench/transfer.py --data DIR" + (
        f" --sources {' '.join(args.sources)}" if args.sources else ""
    )
    generated = report(sources, time.monotonic() - t0, command)
    print(generated)
    write_report(args.out, generated)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
