"""How much routing signal is in the probe's sparsity? A benchmark on public data sets.

Data: the benchmark data folder (--data / $SPARSITY_ROUTER_DATA, see docs/benchmarks.md).

Run: ``.venv/bin/python bench/signal.py [--out bench/results] [--mmlu-n 2000] [--cache DIR]``

Probes every prompt once with the bundled SmolLM2-135M-Instruct at all layers, every metric,
last token and token mean (features cached on disk, chunk by chunk, keyed by the probe's
fingerprint and the exact rendered prompts), then measures:

(a) MATH-500: sparsity vs difficulty level (the paper's experiment and prompt), with and
    without controlling for prompt length;
(b) distribution shift: clean GSM8K vs perturbed copies, MGSM English vs other languages;
(c) routing Mixtral -> GPT-4 on RouteLLM's GSM8K and MMLU outcomes: AUROC, APGR, CPT(50%),
    next to a length-only and a random router;
(d) a per-layer table and a recommended default (layer, metric, position).

Every "best configuration" is chosen on data it is not scored on (a random half, or the
training folds of a 5-fold CV), so the numbers reported for it are honest. Scores are oriented
"higher = sparser" throughout (``probes.metrics.sparsity``), as the router uses them.

Writes ``signal.md`` and ``signal.png`` under ``--out``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # `python bench/signal.py` puts bench/ first on sys.path, where this file would shadow the
    # standard library's `signal` module for everything imported later: use the repo root.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bench._data import (
    MathProblem,
    Outcome,
    add_data_argument,
    char_noise,
    data_root,
    random_tokens,
    read_gsm8k,
    read_math500,
    read_mgsm,
    read_mmlu,
    shuffle_words,
)
from evaluation.metrics import (
    apgr,
    auroc,
    cpt,
    quality_curve,
    stratified_auroc,
)

logger = logging.getLogger("bench.signal")

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

POSITIONS = ("last", "mean")
PAPER_SYSTEM = (
    "You are a helpful math tutor. Solve the math problem step by step and just provide the "
    "final answer."
)
PAPER_SUFFIX = "\n\nPlease just give me the final answer."
SHIFT_LANGS = ("de", "zh", "sw", "te")
PERTURBATIONS = ("shuffled", "char_noise", "random_tokens")
SHIFT_TASKS = (*PERTURBATIONS, *(f"mgsm_{lang}" for lang in SHIFT_LANGS))
SHIFT_LABEL = {
    "shuffled": "words shuffled",
    "char_noise": "30% char noise",
    "random_tokens": "random tokens",
    **{f"mgsm_{lang}": f"MGSM {lang} vs en" for lang in SHIFT_LANGS},
}
SHALLOW_MAX = 14  # the probe must cost <= 0.35 x a full forward: about layer 14 of 30
CHUNK = 256
SEED = 0
N_RANDOM = 200  # random routers drawn for the random baseline


# ----------------------------------------------------------------------------------------
# features


@dataclass(frozen=True, slots=True)
class Config:
    position: str
    layer: int
    metric: str

    def __str__(self) -> str:
        where = "last token" if self.position == "last" else "token mean"
        return f"L{self.layer} {self.metric} ({where})"


@dataclass(slots=True)
class Features:
    """Oriented sparsity (higher = sparser) of n prompts for every configuration."""

    values: FloatArray  # (n, n_configs)
    n_tokens: FloatArray  # (n,)
    truncated: NDArray[np.bool_]  # (n,)

    def subset(self, idx: IntArray | NDArray[np.bool_]) -> Features:
        return Features(self.values[idx], self.n_tokens[idx], self.truncated[idx])


@dataclass(slots=True)
class Space:
    """The searched configurations: positions x layers x metrics, flattened in that order."""

    layers: tuple[int, ...]
    metrics: tuple[str, ...]
    configs: list[Config] = field(init=False)

    def __post_init__(self) -> None:
        self.configs = [
            Config(p, layer, m) for p in POSITIONS for layer in self.layers for m in self.metrics
        ]

    def index(self, position: str, layer: int, metric: str) -> int:
        return self.configs.index(Config(position, layer, metric))

    def mask(self, pred: Callable[[Config], bool]) -> NDArray[np.bool_]:
        return np.array([pred(c) for c in self.configs], dtype=bool)


class BudgetExhausted(Exception):
    """The --max-minutes budget ran out before every feature chunk was computed."""


class Extractor:
    """Runs the probe over prompt lists, caching oriented features chunk by chunk."""

    def __init__(self, cache: Path, max_tokens: int, deadline: float | None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from probes.metric_names import METRIC_NAMES
        from probes.probe import SparsityProbe
        from probes.types import PROBE_VERSION, ProbeSettings

        self.probe = SparsityProbe(
            ProbeSettings(
                layers=tuple(range(1, 31)),
                metrics=METRIC_NAMES,
                token_mean=True,
                device="cpu",
                max_tokens=max_tokens,
            )
        )
        self.layers = tuple(sorted(self.probe.layers))
        self.space = Space(self.layers, METRIC_NAMES)
        fingerprint = {
            **self.probe.fingerprint(),
            "layers": self.layers,
            "metrics": METRIC_NAMES,
            "probe_version": PROBE_VERSION,
            "format": "oriented-v1",
        }
        digest = _digest(json.dumps(fingerprint, sort_keys=True, default=str))
        self.cache = cache / digest[:16]
        self.cache.mkdir(parents=True, exist_ok=True)
        (self.cache / "fingerprint.json").write_text(json.dumps(fingerprint, indent=1, default=str))
        self.deadline = deadline
        self.seconds = 0.0  # spent probing (cache misses only)
        self.probed = 0

    @property
    def tokenizer(self) -> Any:
        return self.probe.loaded.tokenizer

    def features(self, name: str, inputs: Sequence[Any]) -> Features:
        parts = []
        for start in range(0, len(inputs), CHUNK):
            chunk = list(inputs[start : start + CHUNK])
            rendered = "\x00".join(self.probe.render(x, i) for i, x in enumerate(chunk))
            key = _digest(rendered)[:16]
            path = self.cache / f"{name}-{start // CHUNK:03d}-{key}.npz"
            if not path.exists():
                self._compute(name, chunk, path)
            with np.load(path) as z:
                parts.append(
                    Features(
                        z["values"].astype(np.float64),
                        z["n_tokens"].astype(np.float64),
                        z["truncated"].astype(bool),
                    )
                )
        return Features(
            np.concatenate([p.values for p in parts]),
            np.concatenate([p.n_tokens for p in parts]),
            np.concatenate([p.truncated for p in parts]),
        )

    def _compute(self, name: str, chunk: list[Any], path: Path) -> None:
        from probes.metric_names import sparsity

        if self.deadline is not None and time.monotonic() > self.deadline:
            raise BudgetExhausted(name)
        logger.info("probing %s: %d prompts -> %s", name, len(chunk), path.name)
        t0 = time.monotonic()
        results = self.probe.measure(chunk, batch_size=16, progress=True)
        self.seconds += time.monotonic() - t0
        self.probed += len(chunk)
        values = np.empty((len(results), len(self.space.configs)), dtype=np.float32)
        for row, r in enumerate(results):
            tables = {"last": r.metrics, "mean": r.metrics_mean}
            for col, c in enumerate(self.space.configs):
                table = tables[c.position]
                assert table is not None
                values[row, col] = sparsity(c.metric, table[c.layer][c.metric])
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez_compressed(
            tmp,
            values=values,
            n_tokens=np.array([r.n_tokens for r in results], dtype=np.int32),
            truncated=np.array([r.truncated for r in results], dtype=bool),
        )
        os.replace(tmp, path)

    def latency(
        self, prompts: Sequence[str], layers: Sequence[int]
    ) -> tuple[dict[int, float], float]:
        """Seconds per prompt of a probe that stops at each layer (one metric, last token), and
        of the full model's forward pass (LM head included, no cache) on the same batches."""
        import torch

        from probes.probe import SparsityProbe
        from probes.types import ProbeSettings

        def best_of(run: Callable[[], object]) -> float:
            run()  # warm-up
            best = math.inf
            for _ in range(2):
                t0 = time.perf_counter()
                run()
                best = min(best, time.perf_counter() - t0)
            return best / len(prompts)

        out: dict[int, float] = {}
        for layer in layers:
            probe = SparsityProbe(
                ProbeSettings(layers=(layer,), score_layer=layer, metrics=("top1_energy",)),
                loaded=self.probe.loaded,
            )
            out[layer] = best_of(partial(probe.measure, prompts, batch_size=16))

        encoded = sorted((self.probe.encode(p)[0] for p in prompts), key=len)
        batches = []
        for start in range(0, len(encoded), 16):
            chunk = encoded[start : start + 16]
            width = max(len(ids) for ids in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, seq in enumerate(chunk):
                ids[row, width - len(seq) :] = torch.tensor(seq)
                mask[row, width - len(seq) :] = 1
            batches.append((ids, mask))
        model = self.probe.loaded.model

        def full_forward() -> None:
            with torch.inference_mode():
                for ids, mask in batches:
                    model(input_ids=ids, attention_mask=mask, use_cache=False)

        return out, best_of(full_forward)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------
# statistics


def _ranks(x: FloatArray) -> FloatArray:
    from scipy.stats import rankdata

    return np.asarray(rankdata(x, axis=0), dtype=np.float64)


def _pearson_cols(y: FloatArray, X: FloatArray) -> FloatArray:
    yc = y - y.mean()
    Xc = X - X.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (yc @ Xc) / np.sqrt((yc @ yc) * (Xc * Xc).sum(axis=0))
    return np.asarray(r, dtype=np.float64)


def _p_from_r(r: FloatArray, df: int) -> FloatArray:
    from scipy.stats import t as student_t

    with np.errstate(invalid="ignore", divide="ignore"):
        t = r * np.sqrt(df / np.clip(1.0 - r * r, 1e-300, None))
    return np.asarray(2.0 * student_t.sf(np.abs(t), df), dtype=np.float64)


def spearman_cols(y: FloatArray, X: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Spearman rho (and two-sided p) of y with every column of X."""
    X2 = X.reshape(X.shape[0], -1)
    r = _pearson_cols(_ranks(y), _ranks(X2))
    return r, _p_from_r(r, X2.shape[0] - 2)


def partial_spearman_cols(
    y: FloatArray, X: FloatArray, z: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """Spearman rho of y with every column of X controlling for z (partial correlation of ranks)."""
    X2 = X.reshape(X.shape[0], -1)
    ry, rz, rX = _ranks(y), _ranks(z), _ranks(X2)
    r_xy = _pearson_cols(ry, rX)
    r_xz = _pearson_cols(rz, rX)
    r_yz = float(_pearson_cols(ry, rz[:, None])[0])
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (r_xy - r_xz * r_yz) / np.sqrt((1.0 - r_xz**2) * (1.0 - r_yz**2))
    return r, _p_from_r(r, X2.shape[0] - 3)


def bucketed_spearman(y: FloatArray, x: FloatArray, z: FloatArray, buckets: int = 5) -> float:
    """Size-weighted mean of Spearman(y, x) within quantile buckets of z."""
    strata = length_buckets(z, buckets)
    total, weight = 0.0, 0
    for b in np.unique(strata):
        inside = strata == b
        if inside.sum() < 5:
            continue
        r = float(spearman_cols(y[inside], x[inside, None])[0][0])
        if math.isfinite(r):
            total += r * int(inside.sum())
            weight += int(inside.sum())
    return total / weight if weight else math.nan


def length_buckets(n_tokens: FloatArray, buckets: int = 5) -> IntArray:
    edges = np.quantile(n_tokens, np.linspace(0, 1, buckets + 1)[1:-1])
    return np.asarray(np.searchsorted(edges, n_tokens, side="right"), dtype=np.int64)


def residualise(X: FloatArray, n_tokens: FloatArray, fit_rows: NDArray[np.bool_]) -> FloatArray:
    """X minus its least-squares fit on log(n_tokens), the fit made on ``fit_rows`` only."""
    design = np.column_stack([np.ones_like(n_tokens), np.log(n_tokens)])
    coef, *_ = np.linalg.lstsq(design[fit_rows], X[fit_rows], rcond=None)
    return np.asarray(X - design @ coef, dtype=np.float64)


def auroc_cols(X: FloatArray, labels: NDArray[np.bool_]) -> FloatArray:
    """AUROC of every column of X for ``labels`` (ties count 1/2)."""
    ranks = _ranks(X)
    n_pos = int(labels.sum())
    n_neg = labels.shape[0] - n_pos
    u = ranks[labels].sum(axis=0) - n_pos * (n_pos + 1) / 2.0
    return np.asarray(u / (n_pos * n_neg), dtype=np.float64)


def apgr_cols(X: FloatArray, weak: FloatArray, strong: FloatArray) -> FloatArray:
    return np.array([apgr(X[:, j], weak, strong) for j in range(X.shape[1])])


def halves(groups: IntArray, seed: int, strata: IntArray | None = None) -> NDArray[np.bool_]:
    """True for the rows whose group lands in a random half A (stratified when given)."""
    rng = np.random.default_rng(seed)
    ids = np.unique(groups)
    in_a: set[int] = set()
    if strata is None:
        perm = rng.permutation(ids)
        in_a = {int(i) for i in perm[: len(ids) // 2]}
    else:
        for s in np.unique(strata):
            members = np.unique(groups[strata == s])
            perm = rng.permutation(members)
            in_a |= {int(i) for i in perm[: len(members) // 2]}
    return np.array([int(g) in in_a for g in groups], dtype=bool)


def random_router(weak: FloatArray, strong: FloatArray, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    a, c, u = [], [], []
    wrong = weak < 0.5
    for _ in range(N_RANDOM):
        s = rng.random(weak.shape[0])
        a.append(apgr(s, weak, strong))
        c.append(cpt(s, weak, strong, 0.5))
        u.append(auroc(s, wrong))
    return {
        "apgr": float(np.mean(a)),
        "apgr_sd": float(np.std(a)),
        "cpt50": float(np.mean(c)),
        "auroc": float(np.mean(u)),
        "auroc_sd": float(np.std(u)),
    }


# ----------------------------------------------------------------------------------------
# the experiments


@dataclass(slots=True)
class Data:
    math: list[MathProblem]
    math_f: Features
    gsm8k: list[Outcome]
    gsm8k_f: Features
    shift_idx: IntArray  # GSM8K rows that were perturbed
    perturbed_f: dict[str, Features]
    mgsm_f: dict[str, Features]  # "en" and SHIFT_LANGS
    mmlu: list[Outcome]
    mmlu_f: Features


def load_everything(
    ex: Extractor, root: Path, mmlu_n: int, shift_n: int, limit: int | None = None
) -> Data:
    """Read every set and probe it (from the cache where possible); ``limit`` is for smoke tests."""
    cut = slice(None, limit)
    math_rows = read_math500(root)[cut]
    math_inputs = [
        [
            {"role": "system", "content": PAPER_SYSTEM},
            {"role": "user", "content": f"{p.problem}{PAPER_SUFFIX}"},
        ]
        for p in math_rows
    ]
    math_f = ex.features("math500", math_inputs)
    gsm8k = read_gsm8k(root)[cut]
    gsm8k_f = ex.features("gsm8k", [o.prompt for o in gsm8k])

    rng = np.random.default_rng(SEED)
    shift_idx = np.sort(rng.choice(len(gsm8k), size=min(shift_n, len(gsm8k)), replace=False))
    clean = [gsm8k[int(i)].prompt for i in shift_idx]
    tok = ex.tokenizer
    special = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in special]

    def encode(text: str) -> list[int]:
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def decode(ids: Sequence[int]) -> str:
        return str(tok.decode(list(ids)))

    variants: dict[str, list[str]] = {
        "shuffled": [
            shuffle_words(q, np.random.default_rng([SEED, 1, i])) for i, q in enumerate(clean)
        ],
        "char_noise": [
            char_noise(q, np.random.default_rng([SEED, 2, i])) for i, q in enumerate(clean)
        ],
        "random_tokens": [
            random_tokens(q, np.random.default_rng([SEED, 3, i]), encode, decode, vocab)
            for i, q in enumerate(clean)
        ],
    }
    mgsm_f = {"en": ex.features("mgsm_en", read_mgsm(root, "en")[cut])}
    perturbed_f = {k: ex.features(f"gsm8k_{k}", v) for k, v in variants.items()}
    for lang in SHIFT_LANGS:
        mgsm_f[lang] = ex.features(f"mgsm_{lang}", read_mgsm(root, lang)[cut])
    mmlu = read_mmlu(root, mmlu_n if limit is None else min(mmlu_n, limit), SEED)
    mmlu_f = ex.features(f"mmlu{mmlu_n}", [o.prompt for o in mmlu])
    return Data(math_rows, math_f, gsm8k, gsm8k_f, shift_idx, perturbed_f, mgsm_f, mmlu, mmlu_f)


@dataclass(slots=True)
class ShiftTask:
    X: FloatArray  # clean rows first, then shifted
    n_tokens: FloatArray
    shifted: NDArray[np.bool_]
    pair: IntArray  # question id, shared by a clean prompt and its shifted copy


def shift_tasks(d: Data) -> dict[str, ShiftTask]:
    out = {}
    clean = d.gsm8k_f.subset(d.shift_idx)
    for name in SHIFT_TASKS:
        if name in PERTURBATIONS:
            a, b = clean, d.perturbed_f[name]
        else:
            a, b = d.mgsm_f["en"], d.mgsm_f[name.removeprefix("mgsm_")]
        m = a.values.shape[0]
        out[name] = ShiftTask(
            X=np.vstack([a.values, b.values]),
            n_tokens=np.concatenate([a.n_tokens, b.n_tokens]),
            shifted=np.r_[np.zeros(m, bool), np.ones(b.values.shape[0], bool)],
            pair=np.r_[np.arange(m), np.arange(b.values.shape[0])].astype(np.int64),
        )
    return out


@dataclass(slots=True)
class ShiftStats:
    raw: FloatArray  # AUROC per config
    resid: FloatArray  # after regressing out log length (fitted on clean)
    strat: FloatArray  # within length quintiles
    length: float  # AUROC of n_tokens alone
    mixed_share: float  # share of rows in length buckets that hold both classes


def shift_stats(task: ShiftTask, rows: NDArray[np.bool_] | None = None) -> ShiftStats:
    if rows is None:
        rows = np.ones(task.shifted.shape[0], dtype=bool)
    X, n, y = task.X[rows], task.n_tokens[rows], task.shifted[rows]
    resid = residualise(X, n, ~y)
    buckets = length_buckets(n)
    mixed = np.zeros_like(y)
    for b in np.unique(buckets):
        inside = buckets == b
        if 0 < y[inside].sum() < inside.sum():
            mixed |= inside
    strat = np.array([stratified_auroc(X[:, j], y, buckets) for j in range(X.shape[1])])
    return ShiftStats(
        raw=auroc_cols(X, y),
        resid=auroc_cols(resid, y),
        strat=strat,
        length=auroc(n, y),
        mixed_share=float(mixed.mean()),
    )


@dataclass(slots=True)
class RoutingSet:
    name: str
    X: FloatArray
    n_tokens: FloatArray
    weak: FloatArray
    strong: FloatArray

    @property
    def wrong(self) -> NDArray[np.bool_]:
        return np.asarray(self.weak < 0.5, dtype=bool)

    def rows(self, idx: NDArray[np.bool_]) -> RoutingSet:
        return RoutingSet(
            self.name, self.X[idx], self.n_tokens[idx], self.weak[idx], self.strong[idx]
        )


def routing_set(name: str, outcomes: list[Outcome], f: Features) -> RoutingSet:
    return RoutingSet(
        name,
        f.values,
        f.n_tokens,
        np.array([o.weak_correct for o in outcomes], dtype=np.float64),
        np.array([o.strong_correct for o in outcomes], dtype=np.float64),
    )


@dataclass(slots=True)
class CVResult:
    apgr: list[float]
    auroc: list[float]
    cpt50: list[float]
    chosen: list[int]
    length_apgr: list[float]
    random_apgr: list[float]


def cross_validate(
    rs: RoutingSet, allowed: NDArray[np.bool_], folds: int = 5, signs: tuple[int, ...] = (1,)
) -> CVResult:
    """Choose the config (and sign) with the best training APGR; score it on the held-out fold.

    Folds are stratified by the (weak, strong) outcome pair, so every fold has a gap to recover.
    """
    rng = np.random.default_rng(SEED)
    fold = np.empty(rs.X.shape[0], dtype=np.int64)
    outcome = 2 * (rs.weak >= 0.5) + (rs.strong >= 0.5)
    for value in np.unique(outcome):
        idx = rng.permutation(np.flatnonzero(outcome == value))
        fold[idx] = (np.arange(idx.size) + int(value)) % folds
    res = CVResult([], [], [], [], [], [])
    cols = np.flatnonzero(allowed)
    for k in range(folds):
        train, test = rs.rows(fold != k), rs.rows(fold == k)
        if test.weak.mean() == test.strong.mean() or train.weak.mean() == train.strong.mean():
            continue  # only on tiny smoke-test sets
        best, best_val = 0, -math.inf
        for sign in signs:
            vals = apgr_cols(sign * train.X[:, cols], train.weak, train.strong)
            j = int(np.argmax(vals))
            if vals[j] > best_val:
                best, best_val = sign * (int(cols[j]) + 1), float(vals[j])
        j, sign = abs(best) - 1, (1 if best > 0 else -1)
        s = sign * test.X[:, j]
        res.apgr.append(apgr(s, test.weak, test.strong))
        res.auroc.append(auroc(s, test.wrong) if 0 < test.wrong.sum() < len(s) else math.nan)
        res.cpt50.append(cpt(s, test.weak, test.strong, 0.5))
        res.chosen.append(best)
        res.length_apgr.append(apgr(test.n_tokens, test.weak, test.strong))
        res.random_apgr.append(
            float(np.mean([apgr(rng.random(len(s)), test.weak, test.strong) for _ in range(50)]))
        )
    return res


@dataclass(slots=True)
class Analysis:
    space: Space
    # (a)
    math_levels: FloatArray
    math_X: FloatArray
    math_n: FloatArray
    math_rho: FloatArray
    math_p: FloatArray
    math_prho: FloatArray
    math_pp: FloatArray
    math_len_rho: tuple[float, float]
    math_half: NDArray[np.bool_]
    # (b)
    tasks: dict[str, ShiftTask]
    shift: dict[str, ShiftStats]
    shift_half: dict[str, NDArray[np.bool_]]
    # (c)
    routing: dict[str, RoutingSet]
    apgr: dict[str, FloatArray]
    auroc_wrong: dict[str, FloatArray]
    cpt50: dict[str, FloatArray]
    routing_half: dict[str, NDArray[np.bool_]]


def analyse(d: Data, space: Space) -> Analysis:
    levels = np.array([p.level for p in d.math], dtype=np.float64)
    Xm, nm = d.math_f.values, d.math_f.n_tokens
    rho, p = spearman_cols(levels, Xm)
    prho, pp = partial_spearman_cols(levels, Xm, np.log(nm))
    lr, lp = spearman_cols(levels, nm[:, None])
    ids = np.arange(len(levels), dtype=np.int64)
    math_half = halves(ids, SEED, levels.astype(np.int64))

    tasks = shift_tasks(d)
    shift = {k: shift_stats(t) for k, t in tasks.items()}
    shift_half = {k: halves(t.pair, SEED + 1) for k, t in tasks.items()}

    routing = {
        "GSM8K": routing_set("GSM8K", d.gsm8k, d.gsm8k_f),
        "MMLU": routing_set("MMLU", d.mmlu, d.mmlu_f),
    }
    ap, au, cp = {}, {}, {}
    for k, rs in routing.items():
        ap[k] = apgr_cols(rs.X, rs.weak, rs.strong)
        au[k] = auroc_cols(rs.X, rs.wrong)
        cp[k] = np.array([cpt(rs.X[:, j], rs.weak, rs.strong, 0.5) for j in range(rs.X.shape[1])])
    routing_half = {
        k: halves(np.arange(rs.X.shape[0], dtype=np.int64), SEED + 2) for k, rs in routing.items()
    }
    return Analysis(
        space, levels, Xm, nm, rho, p, prho, pp, (float(lr[0]), float(lp[0])), math_half,
        tasks, shift, shift_half, routing, ap, au, cp, routing_half,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------
# report


def fmt(x: float, digits: int = 3) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.{digits}f}"


def fmt_p(p: float) -> str:
    if not math.isfinite(p):
        return "n/a"
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


@dataclass(slots=True)
class Report:
    lines: list[str] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)


CRITERIA = {
    "routing": "best mean APGR (GSM8K, MMLU)",
    "shift": "best mean APGR among configs with char-noise and random-token AUROC ≥ 0.90",
    "all": "as *shift*, and MATH-500 rho(level, score) > 0 with p < 0.01",
}


@dataclass(slots=True)
class Recommendation:
    """Configs chosen on the A halves, per criterion and layer limit (None: no candidate)."""

    chosen: dict[tuple[str, int], int | None]
    best_metric: str

    def pick(self, limit: int) -> tuple[str, int]:
        """The strictest criterion that has a candidate within ``limit``."""
        for name in ("all", "shift", "routing"):
            j = self.chosen[(name, limit)]
            if j is not None:
                return name, j
        raise AssertionError("the routing criterion always has a candidate")


def routing_criterion(a: Analysis, rows: dict[str, NDArray[np.bool_]] | None) -> FloatArray:
    """Mean APGR over GSM8K and MMLU (on the given rows, else all) for every config."""
    vals = []
    for k, rs in a.routing.items():
        sub = rs if rows is None else rs.rows(rows[k])
        vals.append(apgr_cols(sub.X, sub.weak, sub.strong))
    return np.asarray(np.mean(vals, axis=0), dtype=np.float64)


def shift_raw(a: Analysis, name: str, half_a: bool) -> FloatArray:
    task = a.tasks[name]
    rows = a.shift_half[name] if half_a else ~a.shift_half[name]
    return auroc_cols(task.X[rows], task.shifted[rows])


def recommend(a: Analysis) -> Recommendation:
    """Choose on the A halves only: routing APGR, optionally constrained by the shift and MATH
    targets, for layer <= SHALLOW_MAX and for any layer."""
    sp = a.space
    crit_a = routing_criterion(a, a.routing_half)
    shift_ok = (shift_raw(a, "char_noise", True) >= 0.90) & (
        shift_raw(a, "random_tokens", True) >= 0.90
    )
    hA = a.math_half
    rho_a, p_a = spearman_cols(a.math_levels[hA], a.math_X[hA])
    math_ok = (rho_a > 0) & (p_a < 0.01)
    allowed = {"routing": np.ones_like(shift_ok), "shift": shift_ok, "all": shift_ok & math_ok}
    chosen: dict[tuple[str, int], int | None] = {}
    layer_of = np.array([c.layer for c in sp.configs])
    for name, ok in allowed.items():
        for limit in (SHALLOW_MAX, max(sp.layers)):
            m = ok & (layer_of <= limit)
            chosen[(name, limit)] = (
                int(np.argmax(np.where(m, crit_a, -np.inf))) if m.any() else None
            )
    full = routing_criterion(a, None)
    metric_of = np.array([c.metric for c in sp.configs])
    by_metric = {m: float(full[metric_of == m].mean()) for m in sp.metrics}
    others = {m: v for m, v in by_metric.items() if m != "top1_energy"}
    best_metric = max(others, key=lambda m: others[m])
    return Recommendation(chosen, best_metric)


def math_section(a: Analysis, rep: Report, fixed: dict[str, int]) -> dict[str, int]:
    sp, lv, hA, Xm, nm = a.space, a.math_levels, a.math_half, a.math_X, a.math_n
    rep.add(
        "## (a) MATH-500: sparsity vs difficulty level",
        "",
        'Prompt as in the paper (system: math tutor; user: problem + "Please just give me the '
        'final answer."). Spearman rho(level, score) with two-sided p; *partial rho* controls for '
        "log prompt length (partial correlation of ranks, p from t with n-3 df); *bucketed rho* "
        "is the size-weighted mean rho within length quintiles. A configuration is selected on "
        f"a random half A (stratified by level, {int(hA.sum())} problems) and scored on the "
        f"other half B ({int((~hA).sum())}); fixed configurations are scored on all 500.",
        "",
        f"Length alone: rho(level, n_tokens) = {fmt(a.math_len_rho[0])} "
        f"(p = {fmt_p(a.math_len_rho[1])}).",
        "",
    )

    def row(label: str, j: int, rows: NDArray[np.bool_]) -> list[str]:
        x = Xm[rows, j]
        r, p = spearman_cols(lv[rows], x[:, None])
        pr, pp = partial_spearman_cols(lv[rows], x[:, None], np.log(nm[rows]))
        b = bucketed_spearman(lv[rows], x, nm[rows])
        return [label, str(sp.configs[j]), fmt(r[0]), fmt_p(p[0]), fmt(pr[0]), fmt_p(pp[0]), fmt(b)]

    rho_a, _ = spearman_cols(lv[hA], Xm[hA])
    prho_a, _ = partial_spearman_cols(lv[hA], Xm[hA], np.log(nm[hA]))
    shallow = sp.mask(lambda c: c.layer <= SHALLOW_MAX)
    j_rho = int(np.nanargmax(rho_a))
    j_prho = int(np.nanargmax(prho_a))
    j_prho_sh = int(np.nanargmax(np.where(shallow, prho_a, -np.inf)))
    rows = [
        row("best rho on A → B", j_rho, ~hA),
        row("best partial rho on A → B", j_prho, ~hA),
        row(f"best partial rho on A, layer ≤ {SHALLOW_MAX} → B", j_prho_sh, ~hA),
    ]
    everything = np.ones_like(hA)
    rows += [row(f"{label} (all 500)", j, everything) for label, j in fixed.items()]
    rep.add(*table(["router", "config", "rho", "p", "partial rho", "p", "bucketed rho"], rows), "")
    j_best = int(np.nanargmax(a.math_rho))
    j_pbest = int(np.nanargmax(a.math_prho))
    n_sig = int(((a.math_p < 0.01) & (a.math_rho > 0)).sum())
    n_psig = int(((a.math_pp < 0.01) & (a.math_prho > 0)).sum())
    j_worst = int(np.nanargmin(a.math_rho))
    j_pworst = int(np.nanargmin(a.math_prho))
    rep.add(
        f"For scale, in-sample over all 500 and all {len(sp.configs)} configs (chosen after "
        f"the fact, so optimistic): the largest rho is {fmt(a.math_rho[j_best])} "
        f"({sp.configs[j_best]}), the largest partial rho {fmt(a.math_prho[j_pbest])} "
        f"({sp.configs[j_pbest]}); {n_sig} configs have rho > 0 with p < 0.01, {n_psig} have "
        "partial rho > 0 with p < 0.01 (uncorrected for the number of configs searched); "
        f"the most negative rho is {fmt(a.math_rho[j_worst])} ({sp.configs[j_worst]}), "
        f"partial {fmt(a.math_prho[j_pworst])} ({sp.configs[j_pworst]}).",
        "",
    )
    level_rows = []
    columns: dict[str, int | None] = {"n_tokens": None, **fixed, "best partial rho on A": j_prho}
    for label, jj in columns.items():
        x = nm if jj is None else Xm[:, jj]
        z = (x - x.mean()) / x.std()
        name = label if jj is None else f"{label}: {sp.configs[jj]}"
        level_rows.append([name] + [fmt(float(z[lv == k].mean()), 2) for k in range(1, 6)])
    rep.add("Mean z-scored value per level (all 500; higher = sparser / longer):", "")
    rep.add(*table(["", *(f"level {k}" for k in range(1, 6))], level_rows), "")
    r_b, p_b = spearman_cols(lv[~hA], Xm[~hA, j_rho][:, None])
    pr = row("", j_prho, ~hA)
    met = bool(r_b[0] > 0 and p_b[0] < 0.01)
    rep.verdicts.append(
        f"MATH-500 rho(level, score) > 0 with p < 0.01 (selected on half A, scored on half B): "
        f"**{'met' if met else 'not met'}** — rho = {fmt(r_b[0])}, p = {fmt_p(p_b[0])} "
        f"({sp.configs[j_rho]}); but rho(level, length) = {fmt(a.math_len_rho[0])}, and the best "
        f"length-controlled config ({sp.configs[j_prho]}) has partial rho = {pr[4]} "
        f"(p = {pr[5]}) on B."
    )
    return {"j_rho": j_rho, "j_prho": j_prho}


def shift_section(a: Analysis, rep: Report, fixed: dict[str, int]) -> None:
    sp = a.space
    t0 = a.tasks["shuffled"]
    n_clean = int((~t0.shifted).sum())
    rep.add(
        "## (b) Distribution shift: AUROC of the score for shifted vs clean",
        "",
        f"GSM8K: {n_clean} random test questions, clean vs the same questions perturbed "
        "(words shuffled; each non-space character replaced with p = 0.3; random vocabulary ids "
        "as many as the question has tokens, decoded). MGSM: the same 250 problems in English "
        "vs another language. *raw* = AUROC of the score; *length* = AUROC of n_tokens alone; "
        "*resid* = AUROC after regressing the score on log n_tokens (fit on the clean side); "
        "*strat* = AUROC over pairs in the same token-length quintile only (*mixed* = share "
        "of prompts in quintiles holding both classes; low means the classes barely overlap "
        "in length and *strat* rests on few prompts).",
        "",
        "Selected per task on half A of the questions (by raw AUROC), scored on half B. The "
        'probe\'s score is "higher = sparser"; *either sign* repeats the selection allowing '
        'the reversed score ("-": the shifted prompts are *denser*), which the router can '
        "use only if the policy negates the score.",
        "",
    )
    rows = []
    for name in SHIFT_TASKS:
        task, hA = a.tasks[name], a.shift_half[name]
        sel = shift_stats(task, hA)
        j = int(np.nanargmax(sel.raw))
        k = int(np.nanargmax(np.abs(sel.raw - 0.5)))
        flip = bool(sel.raw[k] < 0.5)
        st = shift_stats(task, ~hA)
        rows.append(
            [
                SHIFT_LABEL[name],
                str(sp.configs[j]),
                fmt(st.raw[j]),
                fmt(st.length),
                fmt(st.resid[j]),
                fmt(st.strat[j]),
                fmt(st.mixed_share, 2),
                ("-" if flip else "+") + str(sp.configs[k]),
                fmt(1.0 - st.raw[k] if flip else st.raw[k]),
                fmt(1.0 - st.resid[k] if flip else st.resid[k]),
            ]
        )
    header = [
        "shift", "config (chosen on A)", "raw", "length", "resid", "strat", "mixed",
        "either sign (chosen on A)", "raw", "resid",
    ]  # fmt: skip
    rep.add(*table(header, rows), "")
    rep.add("Fixed configurations (all prompts), raw / resid / strat:", "")
    rows = []
    for label, j in fixed.items():
        cells = [
            " / ".join(fmt(v[j], 2) for v in (st.raw, st.resid, st.strat))
            for st in (a.shift[n] for n in SHIFT_TASKS)
        ]
        rows.append([f"{label}: {sp.configs[j]}", *cells])
    rows.append(["length alone", *(fmt(a.shift[n].length, 2) for n in SHIFT_TASKS)])
    rows.append(["mixed share", *(fmt(a.shift[n].mixed_share, 2) for n in SHIFT_TASKS)])
    rep.add(*table(["router", *(SHIFT_LABEL[n] for n in SHIFT_TASKS)], rows), "")

    for name in ("char_noise", "random_tokens"):
        task, hA = a.tasks[name], a.shift_half[name]
        j = int(np.nanargmax(shift_stats(task, hA).raw))
        st = shift_stats(task, ~hA)
        met = st.raw[j] >= 0.90
        rep.verdicts.append(
            f"{SHIFT_LABEL[name]} vs clean GSM8K AUROC ≥ 0.90 (selected on A, scored on B): "
            f"**{'met' if met else 'not met'}** — {fmt(st.raw[j])} ({sp.configs[j]}; "
            f"length alone {fmt(st.length)}, length-residualised {fmt(st.resid[j])}). "
            + "; ".join(
                f"{label} ({sp.configs[jj]}): {fmt(a.shift[name].raw[jj])}"
                for label, jj in fixed.items()
            )
            + " (all prompts)."
        )


def routing_section(
    a: Analysis, rep: Report, fixed: dict[str, int], randoms: dict[str, dict[str, float]]
) -> dict[str, CVResult]:
    sp = a.space
    rs_g, rs_m = a.routing["GSM8K"], a.routing["MMLU"]
    rep.add(
        "## (c) Routing Mixtral-8x7B → GPT-4 (RouteLLM outcomes)",
        "",
        f"GSM8K: all {rs_g.X.shape[0]} test questions (Mixtral {rs_g.weak.mean():.1%}, GPT-4 "
        f"{rs_g.strong.mean():.1%} correct). MMLU: {rs_m.X.shape[0]} sampled (seed {SEED}) "
        f"after dropping RouteLLM's contaminated prompts (Mixtral {rs_m.weak.mean():.1%}, "
        f"GPT-4 {rs_m.strong.mean():.1%}). The prompts with the highest scores go to GPT-4. "
        "APGR and CPT(50%) per RouteLLM (exact curve, ties routed evenly); AUROC is for "
        '"Mixtral wrong". Random: mean ± sd over '
        f"{N_RANDOM} random scores. Length: more tokens → GPT-4.",
        "",
    )

    def cells(k: str, s: FloatArray) -> list[str]:
        rs = a.routing[k]
        return [
            fmt(apgr(s, rs.weak, rs.strong)),
            fmt(cpt(s, rs.weak, rs.strong, 0.5)),
            fmt(auroc(s, rs.wrong)),
        ]

    rows = [
        [
            "random",
            *[
                x
                for k in a.routing
                for x in (
                    f"{fmt(randoms[k]['apgr'])} ± {fmt(randoms[k]['apgr_sd'])}",
                    fmt(randoms[k]["cpt50"]),
                    f"{fmt(randoms[k]['auroc'])} ± {fmt(randoms[k]['auroc_sd'])}",
                )
            ],
        ],
        ["length", *[x for k in a.routing for x in cells(k, a.routing[k].n_tokens)]],
    ]
    for label, j in fixed.items():
        rows.append(
            [
                f"{label}: {sp.configs[j]}",
                *[x for k in a.routing for x in cells(k, a.routing[k].X[:, j])],
            ]
        )
    header = [
        "router (all prompts)",
        *[f"{k} {m}" for k in a.routing for m in ("APGR", "CPT50", "AUROC")],
    ]
    rep.add(*table(header, rows), "")

    rep.add(
        "Best single configuration chosen by 5-fold CV (best APGR on the 4 training folds, "
        "scored on the held-out fold; mean ± sd over folds). Length and random are scored on "
        "the same held-out folds.",
        "",
    )
    shallow = sp.mask(lambda c: c.layer <= SHALLOW_MAX)
    every = np.ones(len(sp.configs), dtype=bool)
    variants: list[tuple[str, NDArray[np.bool_], tuple[int, ...]]] = [
        ("all configs", every, (1,)),
        (f"layer ≤ {SHALLOW_MAX}", shallow, (1,)),
        ("all configs, either sign", every, (1, -1)),
    ]
    cv: dict[str, CVResult] = {}
    rows = []
    for label, allowed, signs in variants:
        row = [label]
        for k, rs in a.routing.items():
            res = cross_validate(rs, allowed, signs=signs)
            cv[f"{k}/{label}"] = res
            row += [
                f"{fmt(float(np.mean(res.apgr)))} ± {fmt(float(np.std(res.apgr)))}",
                fmt(float(np.mean(res.auroc))),
                fmt(float(np.mean(res.length_apgr))),
                fmt(float(np.mean(res.random_apgr))),
            ]
        rows.append(row)
    header = ["CV search"] + [
        f"{k} {m}" for k in a.routing for m in ("APGR", "AUROC", "length APGR", "random APGR")
    ]
    rep.add(*table(header, rows), "")
    for key, res in cv.items():
        chosen = ", ".join(("-" if c < 0 else "") + str(sp.configs[abs(c) - 1]) for c in res.chosen)
        rep.add(f"- {key}: chosen per fold: {chosen}")
    rep.add("")

    transfer = []
    for src, dst in (("MMLU", "GSM8K"), ("GSM8K", "MMLU")):
        j = int(np.argmax(a.apgr[src]))
        rs = a.routing[dst]
        transfer.append(
            f"best on all of {src} ({sp.configs[j]}, APGR {fmt(a.apgr[src][j])}) → {dst} "
            f"APGR {fmt(apgr(rs.X[:, j], rs.weak, rs.strong))}"
        )
    rep.add("Transfer across datasets: " + "; ".join(transfer) + ".", "")
    for k in a.routing:
        res = cv[f"{k}/all configs"]
        value = float(np.mean(res.apgr))
        rep.verdicts.append(
            f"Product goal APGR ≥ 0.70 on {k} (best single config by 5-fold CV): "
            f"**{'met' if value >= 0.70 else 'not met'}** — {fmt(value)} vs length "
            f"{fmt(float(np.mean(res.length_apgr)))}, "
            f"random {fmt(float(np.mean(res.random_apgr)))}."
        )
    return cv


def layer_section(
    a: Analysis, rep: Report, rec: Recommendation, latency: tuple[dict[int, float], float] | None
) -> None:
    sp = a.space
    rep.add(
        "## (d) Per layer",
        "",
        "All prompts, every number for a fixed configuration (no selection inside a row). "
        "rho, part.rho: MATH-500 Spearman and partial (length-controlled) Spearman with level; "
        "shuf / noise / rand: AUROC vs clean GSM8K; MGSM: mean AUROC over de/zh/sw/te vs en, "
        "raw and length-residualised; APGR and AUROC(Mixtral wrong) on GSM8K (G) and MMLU (M). "
        f'"Best metric" = {rec.best_metric}, the metric other than top1_energy with the '
        "highest routing APGR averaged over all layers and both positions.",
        "",
    )
    if latency:
        per_layer, full = latency
        deepest = max(per_layer)
        fits = [k for k, v in per_layer.items() if v <= 0.35 * full]
        rep.add(
            "Latency (48 GSM8K prompts, batch 16, CPU, best of 2): probe to layer L relative to "
            "the full model's forward pass (LM head over every token, as a plain `model(...)` "
            "call does): "
            + ", ".join(f"L{k}: {v / full:.2f}x" for k, v in sorted(per_layer.items()))
            + f"; relative to the probe run to layer {deepest} (no LM head): "
            + ", ".join(
                f"L{k}: {v / per_layer[deepest]:.2f}x" for k, v in sorted(per_layer.items())
            )
            + f". Deepest measured layer within 0.35x of the full forward: "
            f"L{max(fits) if fits else 'none'}.",
            "",
        )
    header = [
        "L", "rho", "part.rho", "shuf", "noise", "rand", "MGSM", "MGSM resid",
        "G APGR", "M APGR", "G AUROC", "M AUROC",
    ]  # fmt: skip
    for metric in ("top1_energy", rec.best_metric):
        for pos in POSITIONS:
            rows = []
            for layer in sp.layers:
                j = sp.index(pos, layer, metric)
                mgsm = [f"mgsm_{x}" for x in SHIFT_LANGS]
                rows.append(
                    [
                        str(layer),
                        fmt(a.math_rho[j], 2),
                        fmt(a.math_prho[j], 2),
                        *(fmt(a.shift[n].raw[j], 2) for n in PERTURBATIONS),
                        fmt(float(np.mean([a.shift[n].raw[j] for n in mgsm])), 2),
                        fmt(float(np.mean([a.shift[n].resid[j] for n in mgsm])), 2),
                        fmt(a.apgr["GSM8K"][j], 3),
                        fmt(a.apgr["MMLU"][j], 3),
                        fmt(a.auroc_wrong["GSM8K"][j], 3),
                        fmt(a.auroc_wrong["MMLU"][j], 3),
                    ]
                )
            where = "last token" if pos == "last" else "token mean"
            rep.add(f"### {metric}, {where}", "", *table(header, rows), "")


def recommendation_section(
    a: Analysis, rep: Report, rec: Recommendation, randoms: dict[str, dict[str, float]]
) -> list[str]:
    sp = a.space
    last = max(sp.layers)
    rep.add(
        "## Recommended default",
        "",
        "Every choice is made on the A halves only (routing: random halves of GSM8K and MMLU; "
        "shift: half of the questions; MATH: half of the problems), and every number in this "
        "table is on the B halves. Criteria: "
        + "; ".join(f"*{k}* = {v}" for k, v in CRITERIA.items())
        + '. Scores keep the "higher = sparser" orientation the router uses. The recommended '
        "default is the strictest criterion that has a candidate.",
        "",
    )
    hB = ~a.math_half
    rows = []
    summary = []
    for limit in (SHALLOW_MAX, last):
        picked = rec.pick(limit)
        for name in CRITERIA:
            j = rec.chosen[(name, limit)]
            where = f"layer ≤ {limit}" if limit < last else "any layer"
            if j is None:
                rows.append([where, name, "no candidate", *[""] * 12])
                continue
            row = [where, name, str(sp.configs[j])]
            parts = []
            for k, rs in a.routing.items():
                b = rs.rows(~a.routing_half[k])
                v = apgr(b.X[:, j], b.weak, b.strong)
                row += [
                    fmt(v),
                    fmt(cpt(b.X[:, j], b.weak, b.strong, 0.5)),
                    fmt(auroc(b.X[:, j], b.wrong)),
                ]
                parts.append(f"{k} APGR {fmt(v)}")
            shifts = {n: float(shift_raw(a, n, False)[j]) for n in SHIFT_TASKS}
            mgsm = float(np.mean([shifts[f"mgsm_{x}"] for x in SHIFT_LANGS]))
            r, p = spearman_cols(a.math_levels[hB], a.math_X[hB, j][:, None])
            pr, pp = partial_spearman_cols(
                a.math_levels[hB], a.math_X[hB, j][:, None], np.log(a.math_n[hB])
            )
            row += [
                fmt(shifts["char_noise"], 2),
                fmt(shifts["random_tokens"], 2),
                fmt(shifts["shuffled"], 2),
                fmt(mgsm, 2),
                f"{fmt(r[0], 2)} (p {fmt_p(p[0])})",
                f"{fmt(pr[0], 2)} (p {fmt_p(pp[0])})",
            ]
            rows.append(row)
            if (name, j) == picked:
                summary.append(
                    f"{where} (criterion *{name}*): **{sp.configs[j]}** — "
                    + ", ".join(parts)
                    + f"; char-noise AUROC {fmt(shifts['char_noise'], 2)}, random tokens "
                    f"{fmt(shifts['random_tokens'], 2)}, words shuffled "
                    f"{fmt(shifts['shuffled'], 2)}, MGSM mean {fmt(mgsm, 2)}; MATH rho "
                    f"{fmt(r[0], 2)} (p {fmt_p(p[0])}), partial {fmt(pr[0], 2)} "
                    f"(p {fmt_p(pp[0])}) — all on B halves"
                )
        j_r = rec.chosen[("routing", limit)]
        if j_r is not None and j_r != picked[1]:
            routing_b = []
            for k, rs in a.routing.items():
                b = rs.rows(~a.routing_half[k])
                routing_b.append(f"{k} {fmt(apgr(b.X[:, j_r], b.weak, b.strong))}")
            rand_b = float(shift_raw(a, "random_tokens", False)[j_r])
            noise_b = float(shift_raw(a, "char_noise", False)[j_r])
            summary.append(
                f"{where}, routing alone would pick {sp.configs[j_r]}: APGR "
                + ", ".join(routing_b)
                + f", but random-token AUROC {fmt(rand_b, 2)} and char-noise {fmt(noise_b, 2)}"
                " (B halves)"
            )
    base = ["", "length", "n_tokens"]
    for k, rs in a.routing.items():
        b = rs.rows(~a.routing_half[k])
        base += [
            fmt(apgr(b.n_tokens, b.weak, b.strong)),
            fmt(cpt(b.n_tokens, b.weak, b.strong, 0.5)),
            fmt(auroc(b.n_tokens, b.wrong)),
        ]
    length_shift = {}
    for n in SHIFT_TASKS:
        t, rows_b = a.tasks[n], ~a.shift_half[n]
        length_shift[n] = auroc(t.n_tokens[rows_b], t.shifted[rows_b])
    r_len, p_len = spearman_cols(a.math_levels[hB], a.math_n[hB][:, None])
    base += [
        fmt(length_shift["char_noise"], 2),
        fmt(length_shift["random_tokens"], 2),
        fmt(length_shift["shuffled"], 2),
        fmt(float(np.mean([length_shift[f"mgsm_{x}"] for x in SHIFT_LANGS])), 2),
        f"{fmt(r_len[0], 2)} (p {fmt_p(p_len[0])})",
        "",
    ]
    rows.append(base)
    rand = ["", "random", ""]
    for k in a.routing:
        rand += [fmt(randoms[k]["apgr"]), fmt(randoms[k]["cpt50"]), fmt(randoms[k]["auroc"])]
    rows.append([*rand, "0.50", "0.50", "0.50", "0.50", "0", ""])
    header = [
        "layers", "criterion", "config",
        *[f"{k} {m}" for k in a.routing for m in ("APGR", "CPT50", "AUROC")],
        "noise", "rand tok", "shuffled", "MGSM", "MATH rho", "MATH partial rho",
    ]  # fmt: skip
    rep.add(*table(header, rows), "")
    return summary


# ----------------------------------------------------------------------------------------
# figure


def plot(
    a: Analysis, rec: Recommendation, path: Path, fixed: dict[str, int], math_sel: dict[str, int]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sp = a.space
    fig, axes = plt.subplots(2, 3, figsize=(18, 13))
    layers = np.array(sp.layers)
    variants = [
        ("top1_energy", "last", "C0", "-"),
        ("top1_energy", "mean", "C0", "--"),
        (rec.best_metric, "last", "C3", "-"),
        (rec.best_metric, "mean", "C3", "--"),
    ]

    def cols(metric: str, pos: str) -> list[int]:
        return [sp.index(pos, layer, metric) for layer in sp.layers]

    def shallow_line(ax: Any) -> None:
        ax.axvline(SHALLOW_MAX + 0.5, color="grey", lw=0.8, ls=":")

    # (a) level means
    ax = axes[0, 0]
    lv, Xm, nm = a.math_levels, a.math_X, a.math_n
    series: dict[str, FloatArray] = {"n_tokens": nm}
    for label, j in {**fixed, "best partial rho on A": math_sel["j_prho"]}.items():
        series[f"{label}: {sp.configs[j]}"] = Xm[:, j]
    for label, x in series.items():
        z = (x - x.mean()) / x.std()
        means = [z[lv == k].mean() for k in range(1, 6)]
        ax.plot(range(1, 6), means, marker="o", label=label, lw=2 if label == "n_tokens" else 1.2)
    ax.set(
        title="MATH-500: mean z-score by level",
        xlabel="level",
        ylabel="z-score (higher = sparser)",
        xticks=range(1, 6),
    )
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12))

    # (a) rho per layer
    ax = axes[0, 1]
    for metric, pos, color, ls in variants:
        c = cols(metric, pos)
        ax.plot(layers, a.math_rho[c], color=color, ls=ls, label=f"rho {metric} {pos}")
        ax.plot(
            layers,
            a.math_prho[c],
            color=color,
            ls=ls,
            alpha=0.4,
            marker=".",
            label=f"partial rho {metric} {pos}",
        )
    ax.axhline(a.math_len_rho[0], color="k", lw=1, label="rho(level, length)")
    ax.axhline(0, color="grey", lw=0.5)
    shallow_line(ax)
    ax.set(title="MATH-500: Spearman(level, score) by layer", xlabel="layer", ylabel="rho")
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.12))

    # (b) shift AUROC per layer, top1 (last solid, mean dashed)
    ax = axes[0, 2]
    colors = {"shuffled": "C0", "char_noise": "C1", "random_tokens": "C2"}
    for name, color in colors.items():
        for pos, ls in (("last", "-"), ("mean", "--")):
            ax.plot(
                layers,
                a.shift[name].raw[cols("top1_energy", pos)],
                color=color,
                ls=ls,
                label=f"{SHIFT_LABEL[name]} ({pos})",
            )
    for pos, ls in (("last", "-"), ("mean", "--")):
        c = cols("top1_energy", pos)
        mg = np.mean([a.shift[f"mgsm_{x}"].raw[c] for x in SHIFT_LANGS], axis=0)
        mr = np.mean([a.shift[f"mgsm_{x}"].resid[c] for x in SHIFT_LANGS], axis=0)
        ax.plot(layers, mg, color="C4", ls=ls, label=f"MGSM mean ({pos})")
        ax.plot(layers, mr, color="C5", ls=ls, label=f"MGSM mean, length-resid ({pos})")
    ax.axhline(0.9, color="k", lw=0.8, ls=":")
    ax.axhline(0.5, color="grey", lw=0.5)
    shallow_line(ax)
    ax.set(
        title="Shift AUROC by layer (top1_energy)", xlabel="layer", ylabel="AUROC", ylim=(0, 1.02)
    )
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.12))

    # (c) APGR per layer
    for ax, k in zip(axes[1, :2], a.routing, strict=True):
        rs = a.routing[k]
        for metric, pos, color, ls in variants:
            ax.plot(
                layers, a.apgr[k][cols(metric, pos)], color=color, ls=ls, label=f"{metric} {pos}"
            )
        ax.axhline(apgr(rs.n_tokens, rs.weak, rs.strong), color="k", lw=1, label="length")
        ax.axhline(0.5, color="grey", lw=0.8, label="random")
        shallow_line(ax)
        ax.set(title=f"{k}: APGR by layer (all prompts)", xlabel="layer", ylabel="APGR")
        ax.legend(fontsize=7)

    # quality curves
    ax = axes[1, 2]
    for k, color in zip(a.routing, ("C0", "C3"), strict=True):
        rs = a.routing[k]
        gap = rs.strong.mean() - rs.weak.mean()
        j_sh, j_all = rec.pick(SHALLOW_MAX)[1], rec.pick(max(sp.layers))[1]
        curves = [(str(sp.configs[j_sh]), rs.X[:, j_sh], "-")]
        if j_all != j_sh:
            curves.append((str(sp.configs[j_all]), rs.X[:, j_all], "-."))
        curves.append(("length", rs.n_tokens, "--"))
        for label, s, ls in curves:
            share, q = quality_curve(s, rs.weak, rs.strong, np.linspace(0, 1, 201))
            ax.plot(share, (q - rs.weak.mean()) / gap, color=color, ls=ls, label=f"{k}: {label}")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, label="random")
    ax.set(
        title="Performance gap recovered vs share sent to GPT-4",
        xlabel="share to GPT-4",
        ylabel="PGR",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------
# main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--mmlu-n", type=int, default=2000)
    parser.add_argument("--shift-n", type=int, default=300, help="GSM8K questions to perturb")
    parser.add_argument("--cache", type=Path, default=None, help="feature cache folder")
    add_data_argument(parser)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument(
        "--max-minutes", type=float, default=None,
        help="stop probing after this long (cached chunks are kept; re-run to continue)",
    )  # fmt: skip
    parser.add_argument("--no-latency", action="store_true", help="skip the latency check")
    parser.add_argument("--limit", type=int, default=None, help="smoke test: N prompts per set")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    started = time.monotonic()
    from probes.cache import cache_dir

    cache = args.cache or cache_dir() / "bench"
    deadline = None if args.max_minutes is None else started + 60 * args.max_minutes
    root = data_root(args.data)
    ex = Extractor(cache, args.max_tokens, deadline)
    try:
        data = load_everything(ex, root, args.mmlu_n, args.shift_n, args.limit)
    except BudgetExhausted as exc:
        logger.warning(
            "time budget used up before %s: re-run to continue (cache: %s)", exc, ex.cache
        )
        return 3
    probed_s, probed_n = ex.seconds, ex.probed
    latency: tuple[dict[int, float], float] | None = None
    if not args.no_latency:
        prompts = [o.prompt for o in data.gsm8k[:48]]
        latency = ex.latency(prompts, (4, 8, 10, 12, 14, 16, 20, 30))

    logger.info("analysing")
    a = analyse(data, ex.space)
    rec = recommend(a)
    sp = a.space
    last = max(sp.layers)
    fixed = {
        "paper default": sp.index("last", last, "top1_energy"),
        f"recommended (layer ≤ {SHALLOW_MAX})": rec.pick(SHALLOW_MAX)[1],
        "recommended (any layer)": rec.pick(last)[1],
    }
    randoms = {k: random_router(rs.weak, rs.strong, SEED + 7) for k, rs in a.routing.items()}

    body = Report()
    math_sel = math_section(a, body, fixed)
    shift_section(a, body, fixed)
    routing_section(a, body, fixed, randoms)
    summary = recommendation_section(a, body, rec, randoms)
    layer_section(a, body, rec, latency)

    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "signal.png"
    plot(a, rec, png, fixed, math_sel)
    elapsed = time.monotonic() - started
    counts = (
        f"{len(data.math)} MATH-500, {len(data.gsm8k)} GSM8K, "
        f"{len(data.shift_idx)}x{len(PERTURBATIONS)} perturbed GSM8K, "
        f"{len(data.mgsm_f)}x{data.mgsm_f['en'].n_tokens.shape[0]} MGSM, "
        f"{len(data.mmlu)} MMLU prompts"
    )
    truncated = sum(
        int(f.truncated.sum())
        for f in (
            data.math_f,
            data.gsm8k_f,
            data.mmlu_f,
            *data.perturbed_f.values(),
            *data.mgsm_f.values(),
        )
    )
    latency_note = []
    if latency is not None:
        per_layer, full = latency
        ratios = ", ".join(f"L{k} {v / full:.2f}x" for k, v in sorted(per_layer.items()))
        latency_note = [
            f"- Latency of the probe vs a full forward of the model (LM head included): {ratios}."
        ]
    head = [
        "# Routing signal in the probe's sparsity",
        "",
        f"Generated by `bench/signal.py --mmlu-n {args.mmlu_n} --shift-n {args.shift_n}` in "
        f"{elapsed / 60:.1f} min ({probed_n} prompts probed this run in {probed_s / 60:.1f} min; "
        "the rest came from the feature cache). Probe: "
        f"`{ex.probe.settings.model}`, fp32 CPU, chat template, max {args.max_tokens} tokens "
        f"({truncated} prompts tail-truncated); layers 1-{last}, metrics "
        f"{', '.join(sp.metrics)}; last token and token mean: {len(sp.configs)} configurations. "
        f"Prompts: {counts}. Seed {SEED}.",
        "",
        "## Summary",
        "",
        "Targets:",
        "",
        *(f"- {v}" for v in body.verdicts),
        "",
        "Recommended default (chosen on A halves, scored on B halves; see *Recommended default*):",
        "",
        *(f"- {s}" for s in summary),
        *latency_note,
        "",
        f"![signal]({png.name})",
        "",
    ]
    md = args.out / "signal.md"
    md.write_text("\n".join(head + body.lines) + "\n", encoding="utf-8")
    print("\n".join(head))
    print(f"wrote {md} and {png} in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
