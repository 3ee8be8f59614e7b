"""Comparing the vLLM feature probe with the local one: measuring both, the largest differences,
and a default supervised calibration fitted on results already measured.

Used by tests/e2e/test_vllm_features.py (hand-written prompts, in CI) and
bench/vllm_equivalence.py (benchmark prompts and real outcome labels).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from evaluation.outcomes import OutcomeSet
from evaluation.supervised import fit_supervised, plan_label_fit
from probes.calibration import Calibration
from probes.feature_names import POSITIONS, feature_name, feature_value, parse_feature
from probes.feature_table import FeatureTable
from probes.probe import SparsityProbe
from probes.supervised import LENGTH_FEATURE
from probes.types import ProbeInput, ProbeResult
from router.remote_probe import RemoteProbe

__all__ = [
    "COUNTED",
    "Measured",
    "default_calibration",
    "feature_table",
    "measure_both",
    "worst_differences",
]


@dataclass(frozen=True, slots=True)
class Measured:
    inputs: list[ProbeInput]
    local: list[ProbeResult]
    remote: list[ProbeResult]
    remote_s: float  # wall time of the vLLM probe's measurements


async def _measure_remote(
    remote: RemoteProbe, inputs: Sequence[ProbeInput], concurrency: int
) -> list[ProbeResult]:
    gate = asyncio.Semaphore(concurrency)

    async def one(item: ProbeInput) -> ProbeResult:
        async with gate:
            return await remote.ameasure_one(item)

    try:
        return list(await asyncio.gather(*(one(x) for x in inputs)))
    finally:
        await remote.aclose()


def measure_both(
    local: SparsityProbe, remote: RemoteProbe, inputs: Sequence[ProbeInput], concurrency: int = 16
) -> Measured:
    """The local probe in batches of 8, then the vLLM probe ``concurrency`` at a time."""
    want = local.measure(list(inputs), batch_size=8)
    started = time.perf_counter()
    got = asyncio.run(_measure_remote(remote, inputs, concurrency))
    return Measured(list(inputs), want, got, time.perf_counter() - started)


#: A count over the vector's coordinates (|h_i| >= mean + std): at the last token it moves in
#: steps of 1/d (1.7e-3 for d = 576), and a coordinate that sits on the threshold can fall on
#: either side under two float implementations. Reported as coordinates flipped, not as a
#: difference.
COUNTED = "outlier_frac"


def worst_differences(measured: Measured) -> dict[str, float]:
    """The largest |local - vLLM| per kind of feature (the last-token ``outlier_frac`` as the
    number of coordinates that crossed its threshold), asserting the results line up."""
    worst = {
        "metrics last": 0.0,
        "metrics mean": 0.0,
        "vectors": 0.0,
        "score": 0.0,
        "outlier_frac flips": 0.0,
    }
    for item, want, got in zip(measured.inputs, measured.local, measured.remote, strict=True):
        assert (got.n_tokens, got.truncated) == (want.n_tokens, want.truncated), item
        assert want.metrics_mean is not None and got.metrics_mean is not None
        assert want.states is not None and got.states is not None
        assert set(got.metrics) == set(want.metrics) and set(got.states) == set(want.states)
        width = len(next(iter(want.states.values())))
        for layer, values in want.metrics.items():
            for name, value in values.items():
                d_last = abs(got.metrics[layer][name] - value)
                d_mean = abs(got.metrics_mean[layer][name] - want.metrics_mean[layer][name])
                if name == COUNTED:
                    flips = round(d_last * width)
                    worst["outlier_frac flips"] = max(worst["outlier_frac flips"], flips)
                else:
                    worst["metrics last"] = max(worst["metrics last"], d_last)
                worst["metrics mean"] = max(worst["metrics mean"], d_mean)
        for block, vector in want.states.items():
            diff = np.abs(np.asarray(got.states[block]) - np.asarray(vector)).max()
            worst["vectors"] = max(worst["vectors"], float(diff))
        worst["score"] = max(worst["score"], abs(got.score - want.score))
    return worst


def feature_table(results: Sequence[ProbeResult]) -> FeatureTable:
    """The feature table ``calibrate --labels`` would extract (oriented sparsity values, as
    :func:`probes.feature_names.feature_value` reads them from a live result), from results
    already measured: every layer and metric the probe reads, both positions, its vectors."""
    first = results[0]
    assert first.metrics_mean is not None and first.states is not None
    names = [
        feature_name(layer, metric, position)
        for position in POSITIONS
        for layer in first.metrics
        for metric in first.metrics[layer]
    ]
    parsed = [parse_feature(name) for name in names]
    values = np.array(
        [[feature_value(r, la, metric, pos) for la, metric, pos in parsed] for r in results]
    )
    return FeatureTable(
        names=tuple(names),
        values=values,
        n_tokens=np.array([r.n_tokens for r in results], float),
        truncated=np.array([r.truncated for r in results], bool),
        nll=np.full(len(results), np.nan),
        states={
            block: np.array([r.states[block] for r in results], np.float32)  # type: ignore[index]
            for block in first.states
        },
    )


def default_calibration(
    local: SparsityProbe, results: Sequence[ProbeResult], data: OutcomeSet
) -> Calibration:
    """A default supervised calibration (the recipe and fit of ``calibrate --labels``; the
    answer recipe when ``data`` has answers) on ``results``, the local probe's for ``data``."""
    answers = data.answers is not None
    plan = plan_label_fit(local, len(data), answers=answers)
    model = fit_supervised(
        feature_table(results),
        data,
        [f for f in plan.features if f != LENGTH_FEATURE],
        neighbours=[block for _, block in plan.neighbours],
    )
    if answers:
        model = model.model_copy(update={"reads": "answer"})
    base = Calibration.fit(list(results), local.fingerprint(), min_per_bucket=25)
    return base.model_copy(update={"supervised": model})
