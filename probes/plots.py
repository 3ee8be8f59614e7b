"""Pictures of a calibration: score histograms per length bucket and the per-layer profile.

matplotlib is an optional dependency (``pip install sparsity-router[bench]``); it is imported only
when a plot is drawn, and figures are rendered with the Agg canvas directly (no pyplot, no global
backend switch), so plotting is safe from any thread.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from probes.errors import CalibrationError

if TYPE_CHECKING:
    from probes.calibration import Calibration

__all__ = ["plot_calibration"]

logger = logging.getLogger(__name__)


def plot_calibration(calibration: Calibration, path: str | Path, *, dpi: int = 110) -> Path:
    """Write a PNG: left, a histogram of the scores in each length bucket (one row per bucket,
    shared x axis, median marked); right, the score metric's mean ± std at every measured layer
    (last token, and token mean when measured)."""
    path = Path(path)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise CalibrationError(
            "plotting needs matplotlib, which is not installed. Fix: pip install matplotlib "
            "(or sparsity-router[bench]), or leave out --plot"
        ) from None

    fp = calibration.fingerprint
    metric = str(fp.get("metric", "score"))
    buckets = calibration.buckets
    fig = Figure(figsize=(11, max(4.0, 0.9 * len(buckets) + 1.4)), layout="constrained")
    FigureCanvasAgg(fig)
    panels: Any = fig.subfigures(1, 2, width_ratios=(3, 2))
    left, right = panels[0], panels[1]
    hist_axes = left.subplots(len(buckets), 1, sharex=True, squeeze=False)[:, 0]
    layer_ax = right.subplots()

    all_scores = np.concatenate([np.asarray(b.scores) for b in buckets])
    lo, hi = float(all_scores.min()), float(all_scores.max())
    if hi <= lo:
        lo, hi = lo - 0.5e-3, hi + 0.5e-3
    bins = np.linspace(lo, hi, 31)
    colors = [f"C{i % 10}" for i in range(len(buckets))]
    for ax, bucket, color in zip(hist_axes, buckets, colors, strict=True):
        ax.hist(bucket.scores, bins=bins, density=True, color=color, alpha=0.75)
        ax.axvline(float(np.median(bucket.scores)), color="black", linewidth=0.8)
        ax.set_yticks([])
        ax.text(
            0.99,
            0.9,
            f"{bucket.label} tokens, n={bucket.count}",
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=8,
        )
    hist_axes[-1].set_xlabel(f"score ({metric}, higher = sparser); line = median")
    left.suptitle(
        f"score per length bucket: layer {fp.get('layer')}, {fp.get('position')} token, "
        f"n={calibration.n}",
        fontsize=10,
    )

    _layer_panel(layer_ax, calibration, metric)
    fig.suptitle(f"calibration of {fp.get('model')}", fontsize=11)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(str(path), dpi=dpi, format="png")
    except OSError as exc:
        raise CalibrationError(
            f"cannot write plot {path}: {exc.strerror or exc}. Fix: choose a writable path"
        ) from None
    logger.info("wrote calibration plot %s", path)
    return path


def _layer_panel(ax: Any, calibration: Calibration, metric: str) -> None:
    profile = calibration.layers
    if not profile:
        ax.text(0.5, 0.5, "no per-layer profile", ha="center", va="center")
        ax.set_axis_off()
        return
    layers = np.array([p.layer for p in profile])
    mean = np.array([p.last.mean for p in profile])
    std = np.array([p.last.std for p in profile])
    ax.errorbar(layers, mean, yerr=std, marker="o", capsize=3, label="last token")
    if all(p.token_mean is not None for p in profile):
        tm = np.array([p.token_mean.mean for p in profile if p.token_mean is not None])
        ts = np.array([p.token_mean.std for p in profile if p.token_mean is not None])
        ax.errorbar(layers, tm, yerr=ts, marker="s", capsize=3, linestyle="--", label="token mean")
    score_layer = calibration.fingerprint.get("layer")
    if isinstance(score_layer, int):
        ax.axvline(score_layer, color="grey", linewidth=0.8, linestyle=":", label="score layer")
    ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{metric} (mean ± std)")
    ax.set_title("per-layer profile", fontsize=10)
    ax.legend(fontsize=8)
