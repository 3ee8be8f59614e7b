"""What the supervised calibration costs per request, and on disk, with and without the vote.

Run: ``.venv/bin/python bench/supervised_cost.py [--labelled 1319,6000] [--repeat 2000]``

Builds the default supervised model (``calibrate --labels``: 110 sparsity features + the layer-30
hidden vectors, last token and token mean, + log length; 1,263 numbers for SmolLM2's width 576)
on random numbers of the real shapes (the cost does not depend on the values), alone and stacked
with the default nearest-neighbour votes (evaluation.recipes.neighbour_blocks: the token mean of
layer 12, from 2,500 labelled prompts on also layer 18's) on n labelled prompts, and prints per
request: the
latency of ``SupervisedModel.predict`` on one probe result (median and p99 over ``--repeat``
calls), its ratio against the regression alone (the baseline, timed in the same process), the
calibration JSON's size and the time to load it.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import time

import numpy as np

from evaluation.recipes import neighbour_blocks, sparsity_features, supervised_features
from probes.neighbours import NeighbourVote
from probes.supervised import LENGTH_FEATURE, SupervisedModel
from probes.types import ProbeResult

WIDTH = 576
LAYERS = 30


def result(rng: np.random.Generator) -> ProbeResult:
    metrics = {la: {m: float(rng.random()) for m in _metrics()} for la in range(20, LAYERS + 1)}
    vec = {
        f"L{la}.{p}": tuple(float(x) for x in rng.normal(size=WIDTH).astype(np.float32))
        for la in (12, 18, LAYERS)
        for p in ("last", "mean")
    }
    return ProbeResult(
        n_tokens=int(rng.integers(20, 400)),
        score=0.5,
        metrics=metrics,
        metrics_mean=metrics,
        states=vec,
    )


def _metrics() -> list[str]:
    return sorted({f.split(".")[1] for f in sparsity_features(LAYERS)})


def model_for(n: int, rng: np.random.Generator, vote: bool) -> SupervisedModel:
    names = [
        *sparsity_features(LAYERS),
        *(f"L{LAYERS}.state.{p}.{i}" for p in ("last", "mean") for i in range(WIDTH)),
        LENGTH_FEATURE,
    ]
    assert len(names) == len(supervised_features(LAYERS)) - 2 + 2 * WIDTH + 1
    X = rng.normal(size=(n, len(names)))
    y = rng.random(n) < 0.3
    if not vote:
        return SupervisedModel.fit(X, y, names, l2=100.0)
    gains = rng.integers(-1, 2, n).astype(float)
    votes = []
    for block in neighbour_blocks(LAYERS, n):
        vectors = rng.normal(size=(n, WIDTH)).astype(np.float32)
        votes.append((NeighbourVote.fit(vectors, gains, block), vectors))
    loo = np.column_stack([v.votes(z, exclude=np.arange(n)) for v, z in votes])
    stack = (1.0, *(2.0 for _ in votes), 0.0)
    neighbours = [v for v, _ in votes]
    return SupervisedModel.fit(X, y, names, l2=100.0, neighbours=neighbours, stack=stack, votes=loo)


def timed(model: SupervisedModel, results: list[ProbeResult], repeat: int) -> np.ndarray:
    for r in results[:20]:
        model.predict(r)
    out = np.empty(repeat)
    for i in range(repeat):
        r = results[i % len(results)]
        t = time.perf_counter()
        model.predict(r)
        out[i] = time.perf_counter() - t
    return out * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labelled", default="1319,6000", help="comma-separated prompt counts")
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    results = [result(rng) for _ in range(200)]
    base = model_for(1000, rng, vote=False)
    base_us = timed(base, results, args.repeat)
    base_json = base.model_dump_json()
    print(
        f"regression alone (baseline): predict p50 {np.median(base_us):.0f} µs, "
        f"p99 {np.quantile(base_us, 0.99):.0f} µs; JSON {len(base_json) / 1e3:.0f} kB"
    )
    print("| labelled prompts kept | predict p50 | p99 | × baseline p50 | JSON | load |")
    print("|---|---|---|---|---|---|")
    for n in (int(x) for x in args.labelled.split(",")):
        model = model_for(n, rng, vote=True)
        us = timed(model, results, args.repeat)
        text = model.model_dump_json()
        t = time.perf_counter()
        SupervisedModel.model_validate_json(text)
        load = time.perf_counter() - t
        print(
            f"| {n} | {np.median(us):.0f} µs | {np.quantile(us, 0.99):.0f} µs | "
            f"{np.median(us) / np.median(base_us):.1f}× | {len(text) / 1e6:.1f} MB | "
            f"{load * 1e3:.0f} ms |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
