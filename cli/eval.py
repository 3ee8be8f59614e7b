"""``sparsity-router eval --data F``: score the configured router and baselines on outcome data
(:mod:`evaluation.routing`).

The prompts are probed once, at every layer of the probe model, both positions, with the model's
perplexity of the prompt and its hidden vectors, through the on-disk feature cache
(:func:`evaluation.tables.feature_table`): re-running is fast. With ``--answer-column`` the probe
reads each prompt followed by the small model's answer (a user/assistant conversation,
:attr:`evaluation.outcomes.OutcomeSet.probe_inputs`) instead of the prompt: a cascade router,
which checks the small model's answer before returning it.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from cli.options import add_label_options, add_probe_options, build_probe, positive_int, read_labels
from evaluation.baselines import embed_minilm
from evaluation.routing import configured_scores, evaluate, plot_report
from evaluation.tables import feature_table
from probes.calibration import Calibration
from probes.errors import CalibrationError

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    """Add ``eval`` to the CLI's subparsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "eval",
        help="score routers on outcome data (APGR, CPT, AUROC, curves)",
        description="Rank prompts with the configured probe and with baselines (random, "
        "length, perplexity, MiniLM-embedding logistic regression, supervised sparsity), "
        "and report quality vs share sent to the large model, APGR, CPT(50%), CPT(80%) "
        "and AUROC, trained routers by k-fold cross-validation.",
    )
    add_label_options(parser, flag="--data", required=True)
    parser.add_argument("--folds", type=positive_int, default=5, help="CV folds (default 5)")
    parser.add_argument(
        "--calibration",
        metavar="FILE",
        help="calibration JSON: with a supervised model, the configured router is its P",
    )
    parser.add_argument("--plot", metavar="FILE", help="write the quality curves as a PNG")
    parser.add_argument("--json", metavar="FILE", help="write the numbers as JSON")
    parser.add_argument(
        "--no-embedding", action="store_true", help="skip the MiniLM embedding baseline"
    )
    add_probe_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Score the routers and print (and with ``--plot``/``--json`` write) the results."""
    if args.folds < 2:
        raise CalibrationError("--folds must be at least 2")
    data = read_labels(args)
    if len(data) < 2 * args.folds:
        raise CalibrationError(
            f"{len(data)} prompts are too few for {args.folds}-fold CV. Fix: give more "
            "labelled prompts or lower --folds"
        )
    calibration = Calibration.load(args.calibration) if args.calibration else None
    reads = "prompt" if args.answer_column is None else "answer"
    model = calibration.supervised if calibration is not None else None
    if model is not None and model.reads != reads:
        raise CalibrationError(_reads_mismatch(args.calibration, model.reads))
    probe = build_probe(args)
    if calibration is not None:
        calibration.check_fingerprint(probe.fingerprint(), source=args.calibration)
    print(f"{len(data)} labelled prompts; probing (cached in the feature cache) ...", flush=True)
    if reads == "answer":
        print(
            f"the probe reads each prompt plus the small model's answer ({args.answer_column}): "
            "a cascade router, checking that answer before returning it",
            flush=True,
        )
    table = feature_table(
        probe,
        data.probe_inputs,
        args.features_cache,
        state_layers=model.state_layers() if model is not None else (),
    )
    embeddings = None
    if not args.no_embedding:
        print("embedding with all-MiniLM-L6-v2 (cached) ...", flush=True)
        embeddings = embed_minilm(data.prompts, cache_dir=args.features_cache, progress=True)
    report = evaluate(
        data,
        table,
        configured=configured_scores(probe, table, calibration),
        embeddings=embeddings,
        folds=args.folds,
        seed=args.seed,
    )
    print(report.table())
    if args.plot:
        print(f"wrote {plot_report(report, args.plot)}")
    if args.json:
        payload = {
            "n": report.n,
            "folds": report.folds,
            "reads": reads,
            "small_accuracy": report.small_accuracy,
            "large_accuracy": report.large_accuracy,
            "routers": {
                r.name: {k: _finite(r.mean(k)) for k in ("apgr", "cpt50", "cpt80", "auroc")}
                | {"apgr_folds": [_finite(v) for v in r.apgr], "trained": r.trained}
                for r in report.routers
            },
        }
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


def _reads_mismatch(source: str, fitted: str) -> str:
    if fitted == "answer":
        return (
            f"calibration {source} was fitted on prompts plus the small model's answers (a "
            "cascade's check) but --answer-column is not given, so the probe reads the prompts "
            "alone. Fix: give --answer-column NAME, or a calibration fitted without it"
        )
    return (
        f"calibration {source} was fitted on prompts alone but --answer-column makes the probe "
        "read prompts plus the small model's answers. Fix: leave out --answer-column, or give a "
        "calibration fitted with calibrate --labels ... --answer-column NAME"
    )


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
