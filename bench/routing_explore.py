"""Follow-up to bench/routing_eval.py: the ideas it left untried, on the full sets (5-fold CV).

Run: ``.venv/bin/python bench/routing_explore.py [--data DIR]`` (reads the eval feature cache).
Tries: all 420 features, per-length-bucket rank normalisation, gradient boosting
(scikit-learn's HistGradientBoosting), adding the probe's perplexity — next to the shipped
recipe (layers 20-30, 5 metrics, both positions, + log length). One line per router and data
set; results in bench/results/routing_eval.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bench._data import add_data_argument, data_root
from bench.routing_eval import METRICS5, cv_apgr, parse
from evaluation.crossval import fold_ids
from evaluation.metrics import apgr
from evaluation.outcomes import OutcomeSet, read_outcomes

FloatArray = NDArray[np.float64]


def rank_norm(X: FloatArray, n: FloatArray, buckets: int = 8) -> FloatArray:
    """Per prompt-length bucket, each feature becomes its rank percentile inside the bucket."""
    edges = np.quantile(n, np.linspace(0, 1, buckets + 1)[1:-1])
    bucket = np.searchsorted(edges, n)
    out = np.empty_like(X)
    for k in np.unique(bucket):
        rows = bucket == k
        out[rows] = (X[rows].argsort(0).argsort(0) + 0.5) / rows.sum()
    return out


def cv_model(data: OutcomeSet, X: FloatArray, make: Callable[[], Any]) -> tuple[float, float]:
    """5-fold CV APGR of a scikit-learn classifier (same folds as ``eval``)."""
    fold = fold_ids(data.small, data.large, 5, 0)
    scores = []
    for k in range(5):
        train, test = fold != k, fold == k
        model = make()
        model.fit(X[train], data.large_better[train])
        p = model.predict_proba(X[test])[:, 1]
        scores.append(apgr(p, data.small[test], data.large[test]))
    return float(np.mean(scores)), float(np.std(scores))


def boosting() -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(
        max_iter=200, learning_rate=0.05, max_leaf_nodes=15, l2_regularization=1.0, random_state=0
    )


def routers_for(data: OutcomeSet, table: Any) -> dict[str, Callable[[], tuple[float, float]]]:
    """The routers compared on one data set (each a thunk returning mean and sd APGR)."""
    late = [i for i, f in enumerate(table.names) if parse(f)[0] >= 20 and parse(f)[1] in METRICS5]
    n = table.n_tokens.astype(float)
    log_n = np.log(n)
    x_late = np.column_stack([table.values[:, late], log_n])
    x_all = np.column_stack([table.values, log_n])
    return {
        "LR layers 20-30 + length (the shipped recipe)": lambda: cv_apgr(data, x_late),
        "LR all 420 features + length": lambda: cv_apgr(data, x_all),
        "LR rank-normalised layers 20-30 + length": lambda: cv_apgr(
            data, np.column_stack([rank_norm(table.values[:, late], n), log_n])
        ),
        "LR rank-normalised all + length": lambda: cv_apgr(
            data, np.column_stack([rank_norm(table.values, n), log_n])
        ),
        "gradient boosting, layers 20-30 + length": lambda: cv_model(data, x_late, boosting),
        "gradient boosting, all + length": lambda: cv_model(data, x_all, boosting),
        "LR layers 20-30 + length + perplexity": lambda: cv_apgr(
            data, np.column_stack([x_late, table.nll])
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_argument(parser)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from evaluation.tables import feature_table
    from probes.probe import SparsityProbe
    from probes.types import ProbeSettings

    root = data_root(args.data)
    mmlu = root / "routellm" / "mmlu"
    sets = {
        "GSM8K": read_outcomes([root / "routellm" / "gsm8k" / "gsm8k_responses.csv"]),
        "MMLU": read_outcomes(
            [mmlu], exclude=mmlu / "contaminated_prompts.jsonl", sample=2000, seed=0
        ),
    }
    probe = SparsityProbe(ProbeSettings())
    for name, data in sets.items():
        routers = routers_for(data, feature_table(probe, data.prompts, None))
        for label, run in routers.items():
            mean, sd = run()
            print(f"{name}\t{label}\t{mean:.3f} ± {sd:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
