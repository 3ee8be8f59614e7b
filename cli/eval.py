"""``sparsity-router eval --data F``: score the configured router and baselines on outcome data
(:mod:`evaluation.routing`).

The prompts are probed once, at every layer of the probe model, both positions, with the model's
perplexity of the prompt and its hidden vectors, through the on-disk feature cache
(:func:`evaluation.tables.feature_table`): re-running is fast. With ``--answer-column`` the probe
reads each prompt followed by the small model's answer (a user/assistant conversation,
:attr:`evaluation.outcomes.OutcomeSet.probe_inputs`) instead of the prompt: a cascade router,
which checks the small model's answer before returning it.

Outcome files of several families mix in one run: each ``--data``/``--train`` file may carry
its own column mapping (``FILE:prompt=question,small=scores.MODEL,...,name=NAME``) and
``--sources`` reads a manifest of them (:mod:`evaluation.sources`). ``--train FILE...`` fits the
trained routers there and scores every router on ``--data`` (no CV); ``--by-source`` holds out
one source at a time (:func:`evaluation.routing.evaluate_by_source`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from cli.options import (
    add_label_options,
    add_probe_options,
    build_probe,
    label_sources,
    positive_int,
    read_label_sources,
)
from evaluation.baselines import embed_minilm
from evaluation.outcomes import OutcomeSet, concat_outcomes
from evaluation.routing import (
    EvalReport,
    RouterOptions,
    configured_scores,
    evaluate,
    evaluate_by_source,
    evaluate_transfer,
    plot_report,
)
from evaluation.sources import check_names, holdout_groups, parse_source
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
        "and AUROC, trained routers by k-fold cross-validation (or trained on --train, or "
        "leaving one source out with --by-source).",
    )
    add_label_options(parser, flag="--data", required=False, sources=True)
    split = parser.add_argument_group("across sources (no CV)")
    split.add_argument(
        "--train",
        action="extend",
        nargs="+",
        metavar="FILE[:MAP]",
        help="fit the trained routers on these outcome files (the same FILE:MAP syntax as "
        "--data; repeatable) and score every router on the --data/--sources prompts; "
        "--exclude and --sample apply to each side",
    )
    split.add_argument(
        "--by-source",
        action="store_true",
        help="leave one source out: for each --data file (or manifest source), fit on the "
        "others (not on sources sharing its group=) and score on it",
    )
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
    if args.train and args.by_source:
        raise CalibrationError(
            "--train and --by-source exclude each other. Fix: train on given files (--train) "
            "or on the other sources (--by-source)"
        )
    if args.folds < 2:
        raise CalibrationError("--folds must be at least 2")
    specs = label_sources(args)
    if args.by_source:
        check_names(specs)
    data = read_label_sources(args, specs)
    train_rows = None
    if args.train:
        train = _training_set(args, data)
        train_rows = np.arange(len(train) + len(data)) < len(train)
        data = concat_outcomes([train, data])
    elif not args.by_source and len(data) < 2 * args.folds:
        raise CalibrationError(
            f"{len(data)} prompts are too few for {args.folds}-fold CV. Fix: give more "
            "labelled prompts or lower --folds"
        )
    calibration = Calibration.load(args.calibration) if args.calibration else None
    reads = "prompt" if data.answers is None else "answer"
    model = calibration.supervised if calibration is not None else None
    if model is not None and model.reads != reads:
        raise CalibrationError(_reads_mismatch(args.calibration, model.reads))
    probe = build_probe(args)
    if calibration is not None:
        calibration.check_fingerprint(probe.fingerprint(), source=args.calibration)
    print(f"{len(data)} labelled prompts; probing (cached in the feature cache) ...", flush=True)
    if reads == "answer":
        print(
            "the probe reads each prompt plus the small model's answer "
            f"({args.answer_column or 'answer= of the sources'}): a cascade router, checking "
            "that answer before returning it",
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
    configured = configured_scores(probe, table, calibration)
    common: RouterOptions = {"configured": configured, "embeddings": embeddings, "seed": args.seed}
    report: EvalReport
    if train_rows is not None:
        report = evaluate_transfer(data, table, train_rows, **common)
    elif args.by_source:
        report = evaluate_by_source(data, table, holdout=holdout_groups(specs), **common)
    else:
        report = evaluate(data, table, folds=args.folds, **common)
    for line in report.warnings():
        print(f"warning: {line}", file=sys.stderr)
    print(report.table())
    if args.plot:
        print(f"wrote {plot_report(report, args.plot)}")
    if args.json:
        payload = report.numbers() | {"reads": reads}
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


def _training_set(args: argparse.Namespace, test: OutcomeSet) -> OutcomeSet:
    """The ``--train`` rows, less the prompts that are also in the test set (said so)."""
    train = read_label_sources(args, [parse_source(text) for text in args.train])
    seen = set(test.prompts)
    keep = [i for i, p in enumerate(train.prompts) if p not in seen]
    if not keep:
        raise CalibrationError(
            "every --train prompt is also in --data: nothing left to train on. Fix: train on "
            "other outcome data"
        )
    if len(keep) < len(train):
        print(
            f"left out {len(train) - len(keep)} --train prompts that are also in --data",
            flush=True,
        )
        train = train.subset(keep)
    return train


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
