"""Which supervised sparsity router? A feature-set search with honest held-out halves.

Run: ``.venv/bin/python bench/routing_eval.py [--data DIR] [--mmlu-n 2000]``

Reads RouteLLM's GSM8K (all 1,319) and MMLU (a seeded sample after dropping contaminated
prompts, the same rows as ``bench/signal.py``) outcomes, takes probe features from the
``sparsity-router eval`` feature cache (computing what is missing: every layer, both positions,
perplexity) and MiniLM embeddings, and scores candidate routers with the same stratified 5-fold
CV as ``eval`` (L2 by inner CV) on two random halves of each set: the recipe is *chosen* on the
A halves and *reported* on the B halves, so the B numbers carry no selection bias. Prints a
markdown table. The full-set numbers for the chosen recipe come from ``sparsity-router eval``
(commands in bench/results/routing_eval.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import os
import time
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from bench._data import add_data_argument, data_root
from evaluation.baselines import embed_minilm
from evaluation.crossval import fold_ids, inner_l2
from evaluation.metrics import apgr
from evaluation.outcomes import OutcomeSet, read_outcomes
from probes.feature_table import FeatureTable
from probes.supervised import fit_logistic

FloatArray = NDArray[np.float64]
METRICS5 = ("top1_energy", "top10_energy", "effective_rank", "gini", "outlier_frac")


def parse(name: str) -> tuple[int, str, str]:
    layer, metric, pos = name.split(".")
    return int(layer[1:]), metric, pos


FEATURE_SETS: dict[str, Callable[[int, str, str], bool]] = {
    "last token, all layers": lambda la, m, p: p == "last",
    "every 2nd layer, 5 metrics, both": lambda la, m, p: la % 2 == 0 and m in METRICS5,
    "layers 1-14 (cheap probe)": lambda la, m, p: la <= 14,
    "layer 10 only (default probe)": lambda la, m, p: la == 10,
    "layers 20-30": lambda la, m, p: la >= 20,
    "layers 20-30, last token": lambda la, m, p: la >= 20 and p == "last",
    "layers 20-30, 5 metrics": lambda la, m, p: la >= 20 and m in METRICS5,
}


def cv_apgr(
    data: OutcomeSet, X: FloatArray | None, score: FloatArray | None = None, target: str = "better"
) -> tuple[float, float]:
    fold = fold_ids(data.small, data.large, 5, 0)
    y = data.large_better if target == "better" else data.small < 0.5
    out = []
    for k in range(5):
        tr, te = fold != k, fold == k
        if X is None:
            assert score is not None
            s = score[te]
        else:
            lam = inner_l2(X[tr], y[tr], data.small[tr], data.large[tr])
            coef, b, mean, scale = fit_logistic(X[tr], y[tr], l2=lam)
            s = ((X[te] - mean) / scale) @ coef + b
        out.append(apgr(s, data.small[te], data.large[te]))
    return float(np.mean(out)), float(np.std(out))


def rows(data: OutcomeSet, table: FeatureTable, emb: FloatArray, idx: NDArray[np.int64]) -> dict:
    return {
        "data": data.subset(idx),
        "X": table.values[idx],
        "n": table.n_tokens[idx],
        "nll": table.nll[idx],
        "E": emb[idx],
    }


def candidates(names: tuple[str, ...]) -> dict[str, Callable[[dict], tuple[float, float]]]:
    out: dict[str, Callable[[dict], tuple[float, float]]] = {
        "length": lambda d: cv_apgr(d["data"], None, d["n"]),
        "perplexity": lambda d: cv_apgr(d["data"], None, d["nll"]),
        "embedding LR": lambda d: cv_apgr(d["data"], d["E"]),
        "LR length + perplexity": lambda d: cv_apgr(
            d["data"], np.column_stack([np.log(d["n"]), d["nll"]])
        ),
    }
    for label, pred in FEATURE_SETS.items():
        cols = [i for i, f in enumerate(names) if pred(*parse(f))]

        def run(d: dict, cols: list[int] = cols) -> tuple[float, float]:
            return cv_apgr(d["data"], np.column_stack([d["X"][:, cols], np.log(d["n"])]))

        out[f"sparsity LR: {label} + length"] = run
    even = [i for i, f in enumerate(names) if FEATURE_SETS["layers 20-30, 5 metrics"](*parse(f))]
    out["sparsity LR: layers 20-30, 5 metrics + length, target 'small fails'"] = lambda d: cv_apgr(
        d["data"], np.column_stack([d["X"][:, even], np.log(d["n"])]), target="fails"
    )
    out["sparsity LR: layers 20-30, 5 metrics + length + embedding"] = lambda d: cv_apgr(
        d["data"], np.column_stack([d["X"][:, even], np.log(d["n"]), d["E"]])
    )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_argument(parser)
    parser.add_argument("--mmlu-n", type=int, default=2000)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from evaluation.tables import feature_table
    from probes.probe import SparsityProbe
    from probes.types import ProbeSettings

    t0 = time.monotonic()
    root = data_root(args.data)
    mmlu = root / "routellm" / "mmlu"
    sets = {
        "GSM8K": read_outcomes([root / "routellm" / "gsm8k" / "gsm8k_responses.csv"]),
        "MMLU": read_outcomes(
            [mmlu], exclude=mmlu / "contaminated_prompts.jsonl", sample=args.mmlu_n, seed=0
        ),
    }
    probe = SparsityProbe(ProbeSettings())
    results: dict[str, dict[str, dict[str, tuple[float, float]]]] = {}
    for name, data in sets.items():
        table = feature_table(probe, data.prompts, None)
        emb = embed_minilm(data.prompts)
        perm = np.random.default_rng(123 if name == "MMLU" else 7).permutation(len(data))
        halves = {"A": np.sort(perm[: len(data) // 2]), "B": np.sort(perm[len(data) // 2 :])}
        cands = candidates(table.names)
        results[name] = {}
        for half, idx in halves.items():
            d = rows(data, table, emb, idx)
            results[name][half] = {label: fn(d) for label, fn in cands.items()}
            print(f"{name} half {half} ({len(idx)} prompts) done", file=sys.stderr, flush=True)
    labels = list(next(iter(results.values()))["A"])
    trained = [c for c in labels if c.startswith("sparsity LR")]
    chosen = max(trained, key=lambda c: sum(results[n]["A"][c][0] for n in results))
    print(
        "| router (5-fold CV APGR, mean ± sd over folds) | "
        + " | ".join(f"{n} A | {n} B" for n in results)
        + " |"
    )
    print("|---|" + "---|---|" * len(results))
    for c in labels:
        cells = [
            f"{results[n][h][c][0]:.3f} ± {results[n][h][c][1]:.3f}" for n in results for h in "AB"
        ]
        mark = " **(chosen on A)**" if c == chosen else ""
        print(f"| {c}{mark} | " + " | ".join(cells) + " |")
    print(f"\nchosen on the A halves: {chosen}; {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
