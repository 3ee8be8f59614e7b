"""Calibration: turn a raw probe score into a percentile of reference traffic.

A :class:`Calibration` is fitted on the probe results of reference prompts. It keeps the empirical
distribution of the score in a few token-length buckets (sparsity drifts with prompt length, so
a score is compared with references of similar length). Bucket edges are length quantiles chosen
so that every bucket holds at least ``min_per_bucket`` references, with at most ``max_buckets``
buckets. Each bucket stores its sorted scores, reduced to at most ``max_points`` quantile points.

:meth:`Calibration.percentile` is the mid-rank empirical CDF of a score within its bucket::

    percentile = (#{references < score} + ½·#{references == score}) / #references

so it lies in [0, 1], never decreases as the score grows, and is uniform on the reference set
itself: ``threshold_for_share(s)`` (= 1 - s) is the percentile above which a share ``s`` of
reference-like traffic lies. Lengths outside the fitted range use the nearest bucket.

A calibration is only valid for the probe it was fitted with: it carries the probe's
:meth:`~probes.probe.SparsityProbe.fingerprint`, and :meth:`Calibration.load` refuses a file whose
fingerprint differs from the expected one, naming each differing key.

The file is JSON: ``{"kind": "sparsity-router-calibration", "format": 1, ...}``. Its
:attr:`Calibration.id` (12 hex digits of the SHA-256 of its canonical JSON) names it in the
gateway's ``x-router-calibration`` header, metrics and event records.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from probes.errors import CalibrationError
from probes.nway import NWayModel
from probes.supervised import SupervisedModel
from probes.types import ProbeInput, ProbeResult

if TYPE_CHECKING:
    from probes.probe import SparsityProbe

__all__ = [
    "CALIBRATION_FORMAT",
    "CALIBRATION_KIND",
    "QUANTILES",
    "Calibration",
    "LayerProfile",
    "LengthBucket",
    "Moments",
    "ScoreStats",
    "TokenStats",
    "fit_calibration",
]

logger = logging.getLogger(__name__)

#: Version of the file layout; bumped when it changes incompatibly.
CALIBRATION_FORMAT: Final = 1
CALIBRATION_KIND: Final = "sparsity-router-calibration"
#: Score quantiles reported in :class:`ScoreStats`.
QUANTILES: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)

_REFIT = "Fix: re-run sparsity-router calibrate with this probe config"


class _Value(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LengthBucket(_Value):
    """References whose token count lies in ``[lo, hi)`` (``hi`` None: no upper edge)."""

    lo: int = Field(ge=0, description="lower edge in tokens (inclusive)")
    hi: int | None = Field(None, description="upper edge in tokens (exclusive); None = open")
    count: int = Field(ge=1, description="references that fell in the bucket")
    scores: tuple[float, ...] = Field(
        min_length=1, description="sorted scores (quantile points when count > max_points)"
    )

    @model_validator(mode="after")
    def _check(self) -> LengthBucket:
        if self.hi is not None and self.hi <= self.lo:
            raise ValueError(f"bucket upper edge {self.hi} must exceed its lower edge {self.lo}")
        if any(not math.isfinite(s) for s in self.scores):
            raise ValueError("bucket scores must be finite numbers")
        if any(a > b for a, b in zip(self.scores, self.scores[1:], strict=False)):
            raise ValueError("bucket scores must be sorted ascending")
        return self

    @property
    def label(self) -> str:
        """``"12-39"`` or ``"≥40"`` (tokens)."""
        return f"≥{self.lo}" if self.hi is None else f"{self.lo}-{self.hi - 1}"

    def percentile(self, score: float) -> float:
        """Mid-rank empirical CDF of ``score`` among this bucket's scores."""
        below = bisect.bisect_left(self.scores, score)
        at_or_below = bisect.bisect_right(self.scores, score)
        return (below + at_or_below) / (2 * len(self.scores))


class Moments(_Value):
    mean: float
    std: float


class LayerProfile(_Value):
    """Mean and std of the score metric's raw value at one layer over the references."""

    layer: int = Field(ge=0)
    last: Moments = Field(description="at the last prompt token")
    token_mean: Moments | None = Field(None, description="averaged over tokens, when measured")


class ScoreStats(_Value):
    n: int = Field(ge=1)
    mean: float
    std: float
    min: float
    max: float
    quantiles: dict[str, float] = Field(description="'p50' -> value, for q in QUANTILES")


class TokenStats(_Value):
    min: int
    median: float
    max: int
    truncated: int = Field(ge=0, description="references cut to max_tokens")


class Calibration(_Value):
    """Empirical score distribution of reference traffic, per token-length bucket."""

    kind: Literal["sparsity-router-calibration"] = CALIBRATION_KIND
    format: int = CALIBRATION_FORMAT
    created: str = Field(description="UTC time of the fit, ISO 8601")
    fingerprint: dict[str, Any] = Field(description="SparsityProbe.fingerprint() of the fit")
    min_per_bucket: int = Field(ge=1)
    max_buckets: int = Field(ge=1)
    stats: ScoreStats
    tokens: TokenStats
    buckets: tuple[LengthBucket, ...] = Field(min_length=1)
    layers: tuple[LayerProfile, ...] = ()
    supervised: SupervisedModel | None = Field(
        None, description="P(large model does better) model, fitted by calibrate --labels"
    )
    nway: NWayModel | None = Field(
        None,
        description="each candidate model's expected quality (N-way routing, best_of rules), "
        "fitted by calibrate --labels --models",
    )

    @model_validator(mode="before")
    @classmethod
    def _check_format(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "format" in data:
            version = data["format"]
            if isinstance(version, int) and version > CALIBRATION_FORMAT:
                raise ValueError(
                    f"format {version} was written by a newer sparsity-router (this one reads "
                    f"format {CALIBRATION_FORMAT}). Fix: upgrade sparsity-router"
                )
            if version != CALIBRATION_FORMAT:
                raise ValueError(f"unsupported format {version!r} (expected {CALIBRATION_FORMAT})")
        return data

    @model_validator(mode="after")
    def _check_buckets(self) -> Calibration:
        for a, b in zip(self.buckets, self.buckets[1:], strict=False):
            if a.hi != b.lo:
                raise ValueError(f"buckets must be contiguous: {a.label} then {b.label}")
        if self.buckets[-1].hi is not None:
            raise ValueError("the last bucket must be open-ended (hi = null)")
        return self

    # -- identity ----------------------------------------------------------------------------
    @cached_property
    def id(self) -> str:
        """A short stable digest of the content: the first 12 hex digits of the SHA-256 of the
        canonical JSON (sorted keys, no spaces), the same after a save and a load."""
        canonical = json.dumps(
            self.model_dump(mode="json"),
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
        )
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy (with ``update`` applied) whose :attr:`id` is computed afresh."""
        copy = super().model_copy(update=update, deep=deep)
        copy.__dict__.pop("id", None)  # cached_property keeps its value in __dict__
        return copy

    # -- fitting -----------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        results: Sequence[ProbeResult],
        fingerprint: Mapping[str, Any],
        *,
        min_per_bucket: int = 50,
        max_buckets: int = 8,
        max_points: int = 2000,
    ) -> Calibration:
        """Fit on the probe results of reference prompts measured with the fingerprinted probe."""
        if min_per_bucket < 1:
            raise CalibrationError(f"min_per_bucket is {min_per_bucket}; it must be at least 1")
        if max_buckets < 1:
            raise CalibrationError(f"max_buckets is {max_buckets}; it must be at least 1")
        if max_points < 2:
            raise CalibrationError(f"max_points is {max_points}; it must be at least 2")
        n = len(results)
        if n < min_per_bucket:
            raise CalibrationError(
                f"only {n} reference result(s): a calibration needs at least min_per_bucket="
                f"{min_per_bucket}. Fix: give more reference prompts, or lower --min-per-bucket"
            )
        scores = np.array([r.score for r in results], dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(scores))
        if bad.size:
            raise CalibrationError(
                f"reference {int(bad[0])} has a non-finite score ({scores[bad[0]]}): the probe "
                "produced NaN/inf. Fix: check the probe model and dtype (try --dtype float32)"
            )
        lengths = np.array([r.n_tokens for r in results], dtype=np.int64)
        edges = _lower_edges(lengths, min_per_bucket, max_buckets)
        which = np.searchsorted(np.array(edges), lengths, side="right") - 1
        buckets = []
        for i, lo in enumerate(edges):
            mine = np.sort(scores[which == i])
            buckets.append(
                LengthBucket(
                    lo=lo,
                    hi=edges[i + 1] if i + 1 < len(edges) else None,
                    count=int(mine.size),
                    scores=tuple(_quantile_points(mine, max_points)),
                )
            )
        return cls(
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            fingerprint=dict(fingerprint),
            min_per_bucket=min_per_bucket,
            max_buckets=max_buckets,
            stats=ScoreStats(
                n=n,
                mean=float(scores.mean()),
                std=float(scores.std()),
                min=float(scores.min()),
                max=float(scores.max()),
                quantiles={
                    _qname(q): float(v)
                    for q, v in zip(QUANTILES, np.quantile(scores, QUANTILES), strict=True)
                },
            ),
            tokens=TokenStats(
                min=int(lengths.min()),
                median=float(np.median(lengths)),
                max=int(lengths.max()),
                truncated=sum(1 for r in results if r.truncated),
            ),
            buckets=tuple(buckets),
            layers=_layer_profile(results, str(fingerprint.get("metric", ""))),
        )

    # -- use ---------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        """Number of reference results the calibration was fitted on."""
        return self.stats.n

    def bucket_for(self, n_tokens: int) -> LengthBucket:
        """The bucket for a prompt of ``n_tokens`` tokens (the nearest one outside the range)."""
        lows = [b.lo for b in self.buckets]
        return self.buckets[max(0, bisect.bisect_right(lows, n_tokens) - 1)]

    def percentile_of(self, score: float, n_tokens: int) -> float:
        """Percentile in [0, 1] of ``score`` among references of about ``n_tokens`` tokens."""
        if math.isnan(score):
            raise CalibrationError("the score is NaN: it has no percentile")
        return self.bucket_for(n_tokens).percentile(score)

    def percentile(self, result: ProbeResult) -> float:
        """Percentile in [0, 1] of ``result.score`` within its length bucket (higher = sparser)."""
        return self.percentile_of(result.score, result.n_tokens)

    def with_percentile(self, result: ProbeResult) -> ProbeResult:
        """A copy of ``result`` with ``percentile`` (and ``p_large``, when this calibration has
        a supervised model and the result carries its features; ``qualities``, when it has an
        N-way model) filled in."""
        p_large = None
        if self.supervised is not None:
            try:
                p_large = self.supervised.predict(result)
            except (KeyError, ValueError):
                logger.debug("probe result lacks the supervised model's features")
        qualities = None
        if self.nway is not None:
            try:
                costs = self.nway.costs
                qualities = {m: (q, costs[m]) for m, q in self.nway.predict(result).items()}
            except (KeyError, ValueError):
                logger.debug("probe result lacks the N-way model's features")
        return dataclasses.replace(
            result, percentile=self.percentile(result), p_large=p_large, qualities=qualities
        )

    def threshold_for_share(self, share: float) -> float:
        """The percentile above which ``share`` (0..1) of reference traffic lies: ``1 - share``."""
        if not 0.0 <= share <= 1.0:  # also refuses NaN
            raise CalibrationError(
                f"share {share} is not a fraction of traffic: give a value between 0 and 1"
            )
        return 1.0 - share

    def check_fingerprint(self, expected: Mapping[str, Any], *, source: str | None = None) -> None:
        """Refuse (CalibrationError) if this calibration was fitted for a different probe."""
        keys = list(dict.fromkeys([*self.fingerprint, *expected]))
        missing = object()
        differ = [k for k in keys if self.fingerprint.get(k, missing) != expected.get(k, missing)]
        if not differ:
            return
        where = f"calibration {source}" if source else "calibration"
        fitted = ", ".join(f"{k}={_show(self.fingerprint, k)}" for k in differ)
        probe = ", ".join(f"{k}={_show(expected, k)}" for k in differ)
        raise CalibrationError(
            f"{where} was fitted with {fitted}; this probe has {probe}. {_REFIT}"
        )

    # -- files -------------------------------------------------------------------------------
    def to_json(self) -> str:
        return self.model_dump_json(indent=1) + "\n"

    def save(self, path: str | Path) -> Path:
        """Write the calibration as JSON (atomically: a temporary file renamed into place)."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
            try:
                # mkstemp makes the file private (0600): give it the mode a plain write would,
                # so that a gateway running as another user can read it
                os.fchmod(fd, 0o666 & ~_umask())
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    handle.write(self.to_json())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise CalibrationError(
                f"cannot write calibration {path}: {exc.strerror or exc}. Fix: choose a "
                "writable path for --out"
            ) from None
        logger.info("wrote calibration %s (%d references)", path, self.n)
        return path

    @classmethod
    def load(
        cls, path: str | Path, *, expect_fingerprint: Mapping[str, Any] | None = None
    ) -> Calibration:
        """Read a calibration file; with ``expect_fingerprint``, refuse one fitted elsewhere."""
        path = Path(path)
        fix = "Fix: re-create it with sparsity-router calibrate --reference FILE --out " + str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CalibrationError(
                f"calibration file {path} does not exist. Fix: create it with "
                f"sparsity-router calibrate --reference FILE --out {path}"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise CalibrationError(f"cannot read calibration file {path}: {exc}. {fix}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CalibrationError(
                f"calibration file {path} is not valid JSON ({exc.msg} at line {exc.lineno} "
                f"column {exc.colno}). {fix}"
            ) from None
        if not isinstance(data, dict) or data.get("kind") != CALIBRATION_KIND:
            raise CalibrationError(
                f'{path} is not a sparsity-router calibration (no "kind": '
                f'"{CALIBRATION_KIND}"). {fix}'
            )
        try:
            calibration = cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'file'}: {err['msg']}"
                for err in exc.errors()[:5]
            )
            raise CalibrationError(
                f"calibration file {path} is malformed: {problems}. {fix}"
            ) from None
        if expect_fingerprint is not None:
            calibration.check_fingerprint(expect_fingerprint, source=str(path))
        return calibration

    def summary(self) -> str:
        """A few lines for humans: size, buckets, score quantiles."""
        fp = self.fingerprint
        lines = [
            f"calibration: {self.n} references; score = {fp.get('metric')} at layer "
            f"{fp.get('layer')} ({fp.get('position')} token) of {fp.get('model')}",
            f"tokens: min {self.tokens.min}, median {self.tokens.median:g}, max {self.tokens.max}"
            f" ({self.tokens.truncated} truncated to max_tokens={fp.get('max_tokens')})",
            f"length buckets ({len(self.buckets)}):",
            f"  {'tokens':>12}  {'count':>6}  {'p10':>8}  {'p50':>8}  {'p90':>8}",
        ]
        for b in self.buckets:
            p10, p50, p90 = np.quantile(np.array(b.scores), (0.1, 0.5, 0.9))
            lines.append(f"  {b.label:>12}  {b.count:>6}  {p10:>8.4f}  {p50:>8.4f}  {p90:>8.4f}")
        quantiles = "  ".join(f"{k}={v:.4f}" for k, v in self.stats.quantiles.items())
        lines.append(f"score: mean {self.stats.mean:.4f}, std {self.stats.std:.4f}")
        lines.append(f"score quantiles: {quantiles}")
        model = self.supervised
        if model is not None:
            apgr = model.cv.get("apgr")
            lines.append(
                f"supervised p_large: {len(model.features)} features, fitted on {model.n_train} "
                "labelled prompts"
                + (f", CV APGR {apgr:.3f}" if apgr is not None else "")
                + (
                    "; stacked with "
                    + " and ".join(
                        f"the vote of the {v.k} nearest of {v.n} ({v.block})"
                        for v in model.neighbours
                    )
                    if model.neighbours
                    else ""
                )
            )
            if model.reads == "answer":
                lines.append(
                    "it reads the prompt plus the small model's answer: a cascade's check of "
                    "that answer (a policy's cascade, config key calibration.answer_path); it "
                    "cannot route prompts"
                )
        if self.nway is not None:
            unit = self.nway.cost_unit.removeprefix("usd_").replace("_", " ")
            lines.append(
                f"N-way model: {len(self.nway.heads)} models, {len(self.nway.features)} features, "
                f"fitted on {self.nway.n_train} labelled prompts; costs (USD {unit}): "
                + ", ".join(f"{m} {c:g}" for m, c in self.nway.costs.items())
            )
        return "\n".join(lines)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fit_calibration(
    probe: SparsityProbe,
    inputs: Iterable[ProbeInput],
    *,
    min_per_bucket: int = 50,
    max_buckets: int = 8,
    max_points: int = 2000,
    batch_size: int | None = None,
    progress: bool = False,
) -> Calibration:
    """Probe the reference ``inputs`` and fit a calibration for ``probe``."""
    results = probe.measure(inputs, batch_size=batch_size, progress=progress)
    return Calibration.fit(
        results,
        probe.fingerprint(),
        min_per_bucket=min_per_bucket,
        max_buckets=max_buckets,
        max_points=max_points,
    )


# -- helpers ----------------------------------------------------------------------------------


def _lower_edges(lengths: np.ndarray[Any, Any], min_per: int, max_buckets: int) -> list[int]:
    """Lower edges of the length buckets, at length quantiles, each bucket ≥ ``min_per``.

    Walks the distinct lengths in order and opens the j-th new bucket at the first length where
    at least j/k of the references lie below it, the open bucket holds ≥ ``min_per`` and at
    least ``min_per`` remain (k = the target number of buckets). Ties never straddle an edge.
    """
    n = len(lengths)
    k = max(1, min(max_buckets, n // min_per))
    values, counts = np.unique(lengths, return_counts=True)
    edges = [int(values[0])]
    below = 0  # references shorter than the current value
    size = 0  # references in the bucket still open
    for value, count in zip(values.tolist(), counts.tolist(), strict=True):
        if (
            len(edges) < k
            and size >= min_per
            and n - below >= min_per
            and below >= len(edges) * n / k
        ):
            edges.append(int(value))
            size = 0
        size += count
        below += count
    return edges


def _quantile_points(sorted_scores: np.ndarray[Any, Any], max_points: int) -> list[float]:
    """The scores themselves, or ``max_points`` mid-quantiles of them when there are more."""
    if sorted_scores.size <= max_points:
        return [float(s) for s in sorted_scores]
    levels = (np.arange(max_points) + 0.5) / max_points
    return [float(s) for s in np.quantile(sorted_scores, levels)]


def _layer_profile(results: Sequence[ProbeResult], metric: str) -> tuple[LayerProfile, ...]:
    layers = sorted({layer for r in results for layer in r.metrics})
    profile = []
    for layer in layers:
        last = [r.metrics[layer][metric] for r in results if metric in r.metrics.get(layer, {})]
        if not last:
            continue
        mean = [
            r.metrics_mean[layer][metric]
            for r in results
            if r.metrics_mean is not None and metric in r.metrics_mean.get(layer, {})
        ]
        profile.append(
            LayerProfile(
                layer=layer,
                last=_moments(last),
                token_mean=_moments(mean) if len(mean) == len(results) else None,
            )
        )
    return tuple(profile)


def _moments(values: Sequence[float]) -> Moments:
    arr = np.asarray(values, dtype=np.float64)
    return Moments(mean=float(arr.mean()), std=float(arr.std()))


def _qname(q: float) -> str:
    return f"p{q * 100:g}"


def _show(mapping: Mapping[str, Any], key: str) -> str:
    if key not in mapping:
        return "<absent>"
    value = mapping[key]
    return "none" if value is None else str(value)
