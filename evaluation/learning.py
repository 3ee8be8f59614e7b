"""Refitting the supervised calibration from the labels the gateway collected, and deciding
whether the refit beats the calibration now serving (``sparsity-router learn``).

- :func:`labels_outcomes`: ``label`` event records (:class:`router.events.LabelEvent`) as an
  :class:`~evaluation.outcomes.OutcomeSet` (small = 1 - large_better, large = large_better; the
  probe reads what it read at the gateway: the prompt text or the chat messages); labels stored
  without their text (``labelling.store_text`` off) are counted and skipped.
- :func:`learn`: hold back a seeded, stratified share of the labels, fit the candidate on the
  rest with ``calibrate --labels``'s code (:func:`evaluation.supervised.plan_label_fit`,
  :func:`~evaluation.supervised.fit_label_model`, :func:`~evaluation.supervised.label_calibration`),
  score it and the current calibration on the same held-back labels (APGR, and a paired
  bootstrap 95% CI of the difference: :func:`compare`), then refit the candidate on every
  label. :func:`load_candidate` reads a candidate fitted earlier, refusing a broken one.
- :meth:`Comparison.verdict`: promote only when the difference is at least the margin and its
  CI excludes 0 (the promotion itself is :meth:`probes.calibration.Calibration.save`: a
  temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
from numpy.typing import NDArray

from evaluation.metrics import apgr
from evaluation.outcomes import OutcomeSet
from evaluation.routing import configured_scores
from evaluation.supervised import (
    fit_label_model,
    label_calibration,
    plan_label_fit,
    require_both_outcomes,
)
from evaluation.tables import feature_table
from probes.calibration import Calibration
from probes.errors import CalibrationError
from probes.neighbours import DEFAULT_K
from probes.types import ProbeInput
from router.events import LabelEvent, event_from_record

if TYPE_CHECKING:
    from probes.probe import SparsityProbe

__all__ = [
    "FOLDS",
    "MIN_LABELS",
    "Comparison",
    "LabelSet",
    "Learned",
    "check_label_count",
    "compare",
    "holdout_split",
    "label_events",
    "labels_outcomes",
    "learn",
    "load_candidate",
    "paired_apgr_ci",
]

#: The candidate's CV folds (as calibrate --labels) and the fewest labels learn fits on.
FOLDS: Final = 5
MIN_LABELS: Final = 50

FloatArray = NDArray[np.float64]


# -- labels -> outcomes ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LabelSet:
    """The labels learn fits on, and how many it read and skipped."""

    data: OutcomeSet | None  # None when no label carried its input
    read: int  # label records read (the latest one per request)
    without_text: int  # skipped: stored without the probe's input (labelling.store_text off)

    def describe(self) -> str:
        out = f"{self.read} label(s) read"
        if self.without_text:
            out += (
                f"; {self.without_text} skipped: stored without the prompt text, which learn "
                "probes. Fix: set labelling.store_text: true in the gateway's config"
            )
        return out


def label_events(records: Iterable[Mapping[str, Any]]) -> list[LabelEvent]:
    """The ``label`` records of an events sink as events, the latest per request id (a later
    label of a request, e.g. from feedback, replaces an earlier one); others are ignored."""
    latest: dict[str, LabelEvent] = {}
    for record in records:
        if record.get("kind") != LabelEvent.kind:
            continue
        try:
            event = event_from_record(record)
        except ValueError as exc:
            raise CalibrationError(f"a label record is malformed: {exc}") from None
        if isinstance(event, LabelEvent):
            latest.pop(event.request_id, None)
            latest[event.request_id] = event
    return list(latest.values())


def _flat(item: ProbeInput) -> str:
    """A probe input as one text: the prompt, or the messages' text contents one per line."""
    if isinstance(item, str):
        return item
    parts = []
    for message in item:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "\n".join(p for p in parts if p)


def labels_outcomes(labels: Sequence[LabelEvent]) -> LabelSet:
    """The labels as outcomes: large = ``large_better``, small = 1 - it (a tie: 0.5 each, so
    neither did better); prompts are the flattened text, inputs what the probe read."""
    kept = [label for label in labels if label.input]
    skipped = len(labels) - len(kept)
    if not kept:
        return LabelSet(None, len(labels), skipped)
    inputs: list[ProbeInput] = [
        label.input if isinstance(label.input, str) else [dict(m) for m in label.input]
        for label in kept
        if label.input is not None
    ]
    large = np.array([min(1.0, max(0.0, label.large_better)) for label in kept])
    data = OutcomeSet(
        prompts=[_flat(item) for item in inputs],
        small=1.0 - large,
        large=large,
        groups=[label.source for label in kept],
        inputs=inputs,
    )
    return LabelSet(data, len(labels), skipped)


def check_label_count(n: int, *, folds: int = FOLDS, holdout: float = 0.0) -> None:
    """CalibrationError unless ``n`` labels are enough to fit (at least :data:`MIN_LABELS` and
    two per fold, after the held-back share)."""
    need = max(MIN_LABELS, 2 * folds)
    fitted = n - round(n * holdout)
    if n < need or fitted < 2 * folds:
        raise CalibrationError(
            f"{n} usable label(s): learn needs at least {need} (and {2 * folds} after holding "
            f"back {holdout:.0%}). Fix: collect more labels (raise labelling.sample) or export "
            "more with --labels"
        )


# -- held-back scoring -----------------------------------------------------------------------------


def holdout_split(data: OutcomeSet, share: float, seed: int) -> tuple[NDArray[Any], NDArray[Any]]:
    """(fit rows, held-back rows): a seeded ``share`` of each outcome class (large did better
    or not) held back, at least one of each class on both sides."""
    if not 0.0 < share < 1.0:
        raise CalibrationError(f"--holdout {share}: give a share between 0 and 1 (e.g. 0.2)")
    rng = np.random.default_rng(seed)
    better = data.large_better
    held: list[int] = []
    for cls in (True, False):
        rows = rng.permutation(np.flatnonzero(better == cls))
        if rows.size < 2:
            raise CalibrationError(
                f"only {rows.size} label(s) where the large model did "
                f"{'better' if cls else 'not do better'}: learn needs at least 2 of each"
            )
        take = min(rows.size - 1, max(1, round(rows.size * share)))
        held.extend(int(i) for i in rows[:take])
    mask = np.zeros(len(data), dtype=bool)
    mask[held] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def _apgr_or_nan(scores: FloatArray, small: FloatArray, large: FloatArray) -> float:
    try:
        return apgr(scores, small, large)
    except ValueError:  # both models equally good on these rows: no gap to recover
        return math.nan


def paired_apgr_ci(
    candidate: FloatArray,
    current: FloatArray,
    small: FloatArray,
    large: FloatArray,
    *,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile-bootstrap CI of APGR(candidate) - APGR(current), both scored on the same
    resampled rows (resamples where the models are equally good are dropped; None when all
    are)."""
    rng = np.random.default_rng(seed)
    n = small.shape[0]
    diffs = []
    for _ in range(resamples):
        idx = rng.integers(0, n, size=n)
        d = _apgr_or_nan(candidate[idx], small[idx], large[idx]) - _apgr_or_nan(
            current[idx], small[idx], large[idx]
        )
        if math.isfinite(d):
            diffs.append(d)
    if not diffs:
        return None
    alpha = (1 - level) / 2
    lo, hi = np.quantile(np.array(diffs), [alpha, 1 - alpha])
    return float(lo), float(hi)


@dataclass(frozen=True, slots=True)
class Comparison:
    """The candidate and the current calibration scored on the same held-back labels."""

    n_fit: int
    n_holdout: int
    candidate_apgr: float
    current_apgr: float
    current_name: str  # what "current" is: the calibration's id, or the probe's score
    ci: tuple[float, float] | None  # bootstrap CI of the difference
    #: the performance gap APGR divides by: mean(large) - mean(small) on the held-back labels
    #: (the share where the large model did better less the share where the small one did)
    gap: float = math.nan

    @property
    def difference(self) -> float:
        return self.candidate_apgr - self.current_apgr

    def verdict(self, margin: float) -> tuple[bool, str]:
        """(promote?, why): the difference at least ``margin`` and its CI above 0."""
        ci = self.ci
        shown = f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci is not None else "undefined"
        diff = f"APGR difference {self.difference:+.3f} (95% CI {shown})"
        if not math.isfinite(self.difference):
            return False, f"{diff}: the held-back labels do not define APGR"
        if self.difference < margin:
            return False, f"{diff} is below the margin {margin:+.3f}"
        if ci is None or ci[0] <= 0.0:
            return False, f"{diff}: the CI does not exclude 0 (more held-back labels help)"
        return True, f"{diff} clears the margin {margin:+.3f} and its CI excludes 0"

    def lines(self) -> list[str]:
        ci = self.ci
        return [
            f"held back {self.n_holdout} of {self.n_fit + self.n_holdout} labels; "
            f"candidate fitted on {self.n_fit}",
            f"APGR on the held-back labels: candidate {self.candidate_apgr:.3f}, current "
            f"({self.current_name}) {self.current_apgr:.3f}",
            f"difference {self.difference:+.3f}, 95% bootstrap CI "
            + (f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci is not None else "undefined"),
            f"performance gap {self.gap:+.3f} (large better less small better)"
            + ("; APGR is unstable when it is near 0" if abs(self.gap) < 0.1 else ""),
        ]


@dataclass(frozen=True, slots=True)
class Learned:
    """The candidate (refitted on every label) and how it compared on the held-back ones."""

    candidate: Calibration
    comparison: Comparison
    k: int  # labelled prompts per neighbour vote


def _fit(
    probe: SparsityProbe,
    data: OutcomeSet,
    *,
    cache: Path | None,
    features: Sequence[str] | None,
    neighbours: str | None,
    k: int,
    seed: int,
    min_per_bucket: int,
) -> tuple[Calibration, int]:
    """calibrate --labels on ``data`` (the percentiles on the labelled prompts themselves);
    ``k`` is capped at the labels there are less one."""
    require_both_outcomes(data)
    plan = plan_label_fit(probe, len(data), answers=False, features=features, neighbours=neighbours)
    k = min(k, len(data) - 1)
    fitted = fit_label_model(probe, data, plan, cache=cache, k=k, seed=seed)
    calibration = label_calibration(fitted, None, min_per_bucket=min(min_per_bucket, len(data)))
    return calibration, k


def learn(
    probe: SparsityProbe,
    data: OutcomeSet,
    *,
    current: Calibration | None,
    holdout: float = 0.2,
    seed: int = 0,
    cache: Path | None = None,
    features: Sequence[str] | None = None,
    neighbours: str | None = None,
    k: int = DEFAULT_K,
    min_per_bucket: int = 50,
    resamples: int = 2000,
) -> Learned:
    """Fit a candidate on all but a held-back share of ``data``, score it and ``current`` (None:
    the probe's score alone) on that share, and refit the candidate on all of ``data``."""
    check_label_count(len(data), holdout=holdout)
    if current is not None:
        current.check_fingerprint(probe.fingerprint(), source="--current")
        if current.supervised is not None:
            _check_routes_prompts(current, "--current")
    fit_rows, held_rows = holdout_split(data, holdout, seed)
    options: dict[str, Any] = {
        "cache": cache,
        "features": features,
        "neighbours": neighbours,
        "k": k,
        "seed": seed,
        "min_per_bucket": min_per_bucket,
    }
    candidate, _ = _fit(probe, data.subset(fit_rows), **options)
    comparison = compare(
        probe,
        data.subset(held_rows),
        candidate,
        current,
        n_fit=len(fit_rows),
        cache=cache,
        resamples=resamples,
        seed=seed,
    )
    final, k_used = _fit(probe, data, **options)
    return Learned(final, comparison, k_used)


def compare(
    probe: SparsityProbe,
    held: OutcomeSet,
    candidate: Calibration,
    current: Calibration | None,
    *,
    n_fit: int = 0,
    cache: Path | None = None,
    resamples: int = 2000,
    seed: int = 0,
) -> Comparison:
    """APGR of ``candidate`` and ``current`` (None: the probe's score alone) on the labels
    ``held`` (neither was fitted on them), with the paired bootstrap CI of the difference."""
    needs: set[int] = set()
    for calibration in (candidate, current):
        if calibration is not None and calibration.supervised is not None:
            needs.update(calibration.supervised.state_layers())
    table = feature_table(probe, held.probe_inputs, cache, state_layers=sorted(needs))
    _, s_candidate = configured_scores(probe, table, candidate)
    current_name, s_current = configured_scores(probe, table, current)
    return Comparison(
        n_fit=n_fit,
        n_holdout=len(held),
        candidate_apgr=_apgr_or_nan(s_candidate, held.small, held.large),
        current_apgr=_apgr_or_nan(s_current, held.small, held.large),
        current_name=current.id if current is not None else current_name,
        ci=paired_apgr_ci(
            s_candidate, s_current, held.small, held.large, resamples=resamples, seed=seed
        ),
        gap=float(held.large.mean() - held.small.mean()),
    )


def load_candidate(path: str | Path, probe: SparsityProbe) -> Calibration:
    """A calibration file to promote, refused (CalibrationError saying why) unless it is a
    calibration for ``probe`` with a supervised model that routes prompts."""
    calibration = Calibration.load(path, expect_fingerprint=probe.fingerprint())
    _check_routes_prompts(calibration, f"candidate {path}")
    return calibration


def _check_routes_prompts(calibration: Calibration, source: str) -> None:
    model = calibration.supervised
    if model is None:
        raise CalibrationError(
            f"{source} has no supervised model: there is no p_large to compare. Fix: fit one "
            "with sparsity-router learn or calibrate --labels"
        )
    if model.reads == "answer":
        raise CalibrationError(
            f"{source} was fitted on prompts plus answers (a cascade's check); learn compares "
            "prompt calibrations (calibration.path)"
        )
