"""``sparsity-router calibrate --reference F --out calib.json [--plot calib.png]``: fit a
calibration (score percentiles per length bucket) on reference prompts; with ``--labels F`` also
a supervised P(large model does better) model (:mod:`evaluation.supervised`); with ``--labels F
--models a,b,c [--cost a=0.2,...]`` instead each model's expected quality for N-way routing
(``best_of`` rules, :mod:`cli.nway`).

``calibrate --labels`` probes the labelled prompts at every layer through the feature cache
(:func:`evaluation.tables.feature_table`), so after ``eval`` on the same prompts it probes
nothing. With ``--answer-column`` the probe reads each prompt followed by the small model's
answer: the calibration is then a cascade's check (config key ``calibration.answer_path``).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
from typing import Any

from cli.nway import add_nway_options, run_nway_labels
from cli.options import (
    add_input_options,
    add_label_options,
    add_probe_options,
    build_probe,
    comma_list,
    positive_int,
    read_input_file,
    read_labels,
)
from evaluation.supervised import (
    LabelModel,
    fit_label_model,
    label_calibration,
    plan_label_fit,
    require_both_outcomes,
)
from probes.calibration import Calibration, fit_calibration
from probes.errors import CalibrationError
from probes.plots import plot_calibration

__all__ = ["register", "run", "run_labels"]


def register(subparsers: Any) -> None:
    """Add ``calibrate`` to the CLI's subparsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "calibrate",
        help="fit score percentiles on reference prompts",
        description="Probe reference prompts and fit a calibration: the empirical score "
        "distribution per token-length bucket, used to turn scores into percentiles.",
    )
    add_input_options(parser, flag="--reference", required=False)
    parser.add_argument("--out", required=True, metavar="FILE", help="calibration JSON to write")
    parser.add_argument("--plot", metavar="FILE", help="also draw the calibration as a PNG")
    parser.add_argument(
        "--min-per-bucket",
        type=positive_int,
        default=50,
        metavar="N",
        help="least references per length bucket (default 50)",
    )
    parser.add_argument(
        "--max-buckets",
        type=positive_int,
        default=8,
        metavar="N",
        help="most length buckets (default 8)",
    )
    add_label_options(parser, flag="--labels", required=False)
    parser.add_argument(
        "--features",
        type=comma_list,
        metavar="LIST",
        help="with --labels: the supervised model's features, e.g. L10.gini.last,L28.top1_energy"
        ".mean,log_tokens (default: evaluation.recipes.default_recipe: supervised_features, or "
        "with --answer-column answer_features, layers 2-12 of 30 and layer 12's vectors)",
    )
    parser.add_argument(
        "--neighbours",
        metavar="LIST",
        help="with --labels: the hidden vectors whose nearest labelled prompts vote (one vote "
        "each, stacked with the regression), e.g. L12.state.mean,L18.state.mean; 'none' for the "
        "regression alone (default: the token mean at 40%% of the probe's depth, and from 2,500 "
        "labelled prompts on also the one at 60%%: evaluation.recipes.neighbour_blocks; with "
        "--answer-column only the one at 40%%)",
    )
    parser.add_argument(
        "--neighbours-k",
        type=positive_int,
        default=50,
        metavar="K",
        help="with --labels: labelled prompts averaged per neighbour vote (default 50)",
    )
    add_nway_options(parser)
    add_probe_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Fit the calibration and write it to ``--out``."""
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise CalibrationError(
            "--plot needs matplotlib, which is not installed. Fix: pip install matplotlib, "
            "or leave out --plot"
        )
    if os.path.isdir(args.out):
        raise CalibrationError(f"--out {args.out} is a directory. Fix: give a file name")
    if args.outcomes and args.models:
        return _write_calibration(run_nway_labels(args), args)
    if args.models or args.cost or args.cost_column:
        if not args.outcomes:
            raise CalibrationError(
                "--models, --cost and --cost-column fit an N-way model on labelled prompts. Fix: "
                "give --labels FILE with each model's results"
            )
        raise CalibrationError("--cost and --cost-column need --models a,b,c")
    if args.outcomes:
        return _write_calibration(run_labels(args), args)
    if not args.reference:
        raise CalibrationError(
            "nothing to fit. Fix: give --reference FILE (prompts) and/or --labels FILE "
            "(prompts with both models' outcomes)"
        )
    inputs = read_input_file(args.reference, args.column)
    probe = build_probe(args)
    calibration = fit_calibration(
        probe,
        inputs,
        min_per_bucket=args.min_per_bucket,
        max_buckets=args.max_buckets,
        progress=True,
    )
    return _write_calibration(calibration, args)


def run_labels(args: argparse.Namespace) -> Calibration:
    """Fit the percentile calibration (on ``--reference``, else the labelled prompts) and the
    supervised P(large does better) model on ``--labels``; returns the combined calibration."""
    data = read_labels(args)
    require_both_outcomes(data)
    probe = build_probe(args)
    plan = plan_label_fit(
        probe,
        len(data),
        answers=data.answers is not None,
        features=args.features,
        neighbours=args.neighbours,
    )
    print(f"{len(data)} labelled prompts; probing (cached in the feature cache) ...", flush=True)
    if data.answers is not None:
        print(
            f"the probe reads each prompt plus the small model's answer ({args.answer_column}): "
            "this calibration is for a policy's cascade (config key calibration.answer_path) and "
            "cannot route prompts",
            flush=True,
        )
    fitted = fit_label_model(
        probe, data, plan, cache=args.features_cache, k=args.neighbours_k, seed=args.seed
    )
    reference = read_input_file(args.reference, args.column) if args.reference else None
    calibration = label_calibration(
        fitted, reference, min_per_bucket=args.min_per_bucket, max_buckets=args.max_buckets
    )
    print("\n".join(_fit_summary(fitted, probe.score_layer)))
    return calibration


def _fit_summary(fitted: LabelModel, score_layer: int) -> list[str]:
    """What was fitted, its CV scores and the probe settings that serve it."""
    model = fitted.model
    cv = model.cv
    lines = [
        f"supervised model: {len(model.features)} features, L2 {model.l2:g}, "
        f"{model.positives} of {model.n_train} prompts where the large model did better; "
        f"{int(cv.get('folds', 5))}-fold CV APGR {cv.get('apgr', math.nan):.3f}, "
        f"AUROC {cv.get('auroc', math.nan):.3f}, CPT(50%) {cv.get('cpt50', math.nan):.1%}"
    ]
    if model.neighbours and model.stack is not None:
        a, *b, _ = model.stack
        for vote in model.neighbours:
            lines.append(
                f"neighbour vote: {vote.block}, mean gain of the {vote.k} nearest of {vote.n} "
                "labelled prompts"
            )
        terms = " + ".join(
            f"{w:.2f} x {v.block} vote" for w, v in zip(b, model.neighbours, strict=True)
        )
        lines.append(f"stacked as {a:.2f} x regression log-odds + {terms}")
    quant = ", ".join(f"{k} {v:.3f}" for k, v in model.p_quantiles.items())
    lines.append(f"p_large on the labelled prompts: {quant}")
    s = fitted.serving.settings
    lines.append(
        "serve it with probe settings layers: "
        f"[{', '.join(str(x) for x in sorted(s.layers))}], score_layer: {score_layer}"
        + (", token_mean: true" if s.token_mean else "")
        + (
            f", state_layers: [{', '.join(str(x) for x in s.state_layers)}]"
            if s.state_layers
            else ""
        )
    )
    return lines


def _write_calibration(calibration: Calibration, args: argparse.Namespace) -> int:
    """Save the calibration to ``--out``, print its summary, and plot it with ``--plot``."""
    calibration.save(args.out)
    print(calibration.summary())
    print(f"wrote {args.out}")
    if args.plot:
        plot_calibration(calibration, args.plot)
        print(f"wrote {args.plot}")
    return 0
