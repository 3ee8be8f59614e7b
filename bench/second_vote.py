"""One neighbour vote or two? The default's size rule, re-measured on several fold splits.

Run: ``.venv/bin/python bench/second_vote.py [--data DIR] [--sets gsm8k,mmlu-2000,mmlu-14037]
[--seeds 0,1,2,3]``

For each data set (RouteLLM GSM8K, or MMLU: all prompts or a seeded sample after dropping the
contaminated ones) and each fold split (the stratified 5-fold split of ``sparsity-router eval``
with that seed), scores the supervised default ``probe LR + kNN`` twice on the same folds, with
exactly the product's code path (:mod:`evaluation`): stacked with the vote on layer 12's token
mean alone, and with votes on layers 12 and 18 (:func:`evaluation.recipes.neighbour_blocks` below
and from ``SECOND_VOTE_FROM`` labelled prompts). Prints one markdown row per set and
split: both APGRs, their difference (the baseline is the one-vote router of the same run) and
the folds where the second vote helps. Features come from the ``eval`` feature cache (probed
on first use: ~0.4 s per prompt on 2 cores).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import os

import numpy as np

from bench._data import add_data_argument, data_root
from evaluation.crossval import cv_stacked, fold_ids
from evaluation.outcomes import OutcomeSet, read_outcomes
from evaluation.recipes import SECOND_VOTE_FROM, neighbour_blocks, supervised_features
from evaluation.tables import block_vectors, feature_table, supervised_matrix
from probes.neighbours import DEFAULT_K
from probes.probe import SparsityProbe
from probes.types import ProbeSettings


def load(name: str, root: Path) -> OutcomeSet:
    routellm = root / "routellm"
    if name == "gsm8k":
        return read_outcomes([routellm / "gsm8k" / "gsm8k_responses.csv"])
    if not name.startswith("mmlu-"):
        raise SystemExit(f"--sets: {name!r} is not gsm8k or mmlu-N")
    n = int(name.split("-", 1)[1])
    return read_outcomes(
        [routellm / "mmlu"],
        exclude=routellm / "mmlu" / "contaminated_prompts.jsonl",
        sample=n,
        seed=0,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_argument(parser)
    parser.add_argument("--sets", default="gsm8k,mmlu-2000,mmlu-14037")
    parser.add_argument("--seeds", default="0,1,2,3", help="fold-split seeds")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = data_root(args.data)
    probe = SparsityProbe(ProbeSettings())
    print(
        "| set | labelled | split seed | one vote (L12) | two votes (L12 + L18) | diff | "
        "folds helped |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.sets.split(","):
        data = load(name.strip(), root)
        table = feature_table(probe, data.prompts, None, progress=True)
        X, names = supervised_matrix(table, supervised_features(probe.n_layers))
        one = neighbour_blocks(probe.n_layers, SECOND_VOTE_FROM - 1)
        two = neighbour_blocks(probe.n_layers, SECOND_VOTE_FROM)
        vectors = {b: block_vectors(table, b) for b in two}
        for seed in (int(s) for s in args.seeds.split(",")):
            folds = fold_ids(data.small, data.large, 5, seed)
            runs = [
                cv_stacked(
                    "probe LR + kNN",
                    X,
                    names,
                    [vectors[b] for b in blocks],
                    data,
                    folds,
                    blocks,
                    DEFAULT_K,
                    "",
                )
                for blocks in (one, two)
            ]
            diff = np.array(runs[1].apgr) - np.array(runs[0].apgr)
            print(
                f"| {name} | {len(data)} | {seed} | {runs[0].mean('apgr'):.3f} | "
                f"{runs[1].mean('apgr'):.3f} | {diff.mean():+.4f} | "
                f"{int((diff > 0).sum())} of {diff.size} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
