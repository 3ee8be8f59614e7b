"""``sparsity-router eval-nway --data F [--models a,b,c] [--cost a=0.2,...]``: cross-validate
N-way routing (each model's quality predicted from the probe's features, :mod:`probes.nway`) on
outcome data with several models' results, against each single model, their random mixtures and
the oracle (:mod:`evaluation.nway`); ``calibrate --labels F --models a,b,c`` fits it for the
gateway (:func:`run_nway_labels`).

Costs: ``--cost a=0.2,b=1.5`` in USD per million tokens, or ``--cost-column '{model}|total_cost'``
for per-request costs in the file (RouterBench). Without either, every model costs the same:
only the accuracy of the argmax router means something (RouterDC's comparison).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cli.options import (
    add_features_cache_option,
    add_probe_options,
    build_probe,
    comma_list,
    positive_int,
)
from evaluation.nway import (
    COST_COLUMN,
    NWayData,
    NWayReport,
    concat_nway,
    evaluate_nway,
    fit_nway,
    nway_calibration,
    nway_features,
    parse_costs,
    plot_nway,
    read_nway,
)
from evaluation.outcomes import DEFAULT_PROMPT
from probes.calibration import Calibration
from probes.errors import CalibrationError
from probes.nway import CostUnit

__all__ = ["add_nway_options", "nway_costs", "register", "run", "run_nway_labels"]


def add_nway_options(parser: argparse.ArgumentParser) -> None:
    """``--models``, ``--cost``, ``--cost-column`` and ``--link``."""
    group = parser.add_argument_group("N-way routing")
    group.add_argument(
        "--models",
        type=comma_list,
        metavar="LIST",
        help="the candidate models, as named by the files' quality columns, e.g. a,b,c "
        "(RouterDC's JSON: default every model of its scores)",
    )
    group.add_argument(
        "--cost",
        metavar="LIST",
        help="each model's price in USD per million tokens, e.g. a=0.2,b=1.5,c=0.1",
    )
    group.add_argument(
        "--cost-column",
        metavar="PATTERN",
        help=f"per-request costs in the files, {{model}} standing for the model, e.g. "
        f"'{COST_COLUMN}' (RouterBench)",
    )
    group.add_argument(
        "--link",
        choices=("identity", "logit"),
        default="identity",
        help="identity: ridge regression per model (default); logit: logistic regression on "
        "the soft labels",
    )


def nway_costs(args: argparse.Namespace, data: NWayData) -> tuple[list[float], CostUnit, str]:
    """(each model's cost, its unit, a note) from ``--cost`` / ``--cost-column``."""
    if args.cost and args.cost_column:
        raise CalibrationError("give --cost or --cost-column, not both")
    if args.cost:
        priced = parse_costs(args.cost, data.models)
        return [priced[m] for m in data.models], "usd_per_mtok", "USD per million tokens"
    mean = data.mean_costs()
    if mean is not None:
        return [float(c) for c in mean], "usd_per_request", "USD per request"
    return [0.0] * len(data.models), "usd_per_mtok", "no costs given: every model costs 0"


def _read(args: argparse.Namespace, paths: list[str]) -> NWayData:
    # calibrate's --prompt-column defaults to RouteLLM's "prompt"; RouterDC's is "question"
    prompt = None if args.prompt_column in (None, DEFAULT_PROMPT) else args.prompt_column
    parts = [
        read_nway(p, args.models, prompt_col=prompt, cost_column=args.cost_column) for p in paths
    ]
    return concat_nway(parts).sample(args.sample, args.seed)


def register(subparsers: Any) -> None:
    """Add ``eval-nway`` to the CLI's subparsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "eval-nway",
        help="cross-validate N-way routing on several models' outcomes",
        description="Fit each model's quality from the probe's features (k-fold CV over "
        "prompts) and compare the router with each single model, their random mixtures and "
        "the oracle.",
    )
    parser.add_argument(
        "--data",
        dest="outcomes",
        action="append",
        required=True,
        metavar="FILE",
        help="outcome file (RouterDC JSON, RouterBench CSV, ...); repeat to combine",
    )
    parser.add_argument("--prompt-column", metavar="NAME", help="default: question or prompt")
    parser.add_argument("--sample", type=positive_int, metavar="N", help="a seeded sample")
    parser.add_argument("--seed", type=int, default=0, help="sampling and fold seed")
    parser.add_argument("--folds", type=positive_int, default=5, metavar="K")
    add_features_cache_option(parser)
    parser.add_argument(
        "--features",
        type=comma_list,
        metavar="LIST",
        help="the heads' features (default: the supervised recipe's)",
    )
    parser.add_argument("--json", metavar="FILE", help="write the report (and curve) as JSON")
    parser.add_argument("--plot", metavar="FILE", help="draw quality against cost as a PNG")
    add_nway_options(parser)
    add_probe_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Cross-validate and print the report."""
    if args.folds < 2:
        raise CalibrationError("--folds must be at least 2")
    data = _read(args, args.outcomes)
    costs, _unit, note = nway_costs(args, data)
    if len(data) < 2 * args.folds:
        raise CalibrationError(
            f"{len(data)} prompts are too few for {args.folds}-fold CV. Fix: give more or "
            "lower --folds"
        )
    probe = build_probe(args)
    X, _names, _table = nway_features(probe, data, args.features_cache, args.features)
    report = evaluate_nway(
        X, data, costs, folds=args.folds, seed=args.seed, link=args.link, cost_note=note
    )
    print("\n".join(report_lines(report)))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot_nway(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def report_lines(report: NWayReport) -> list[str]:
    """The report for humans."""
    best, acc, cost = report.best_single
    lines = [f"{report.n} prompts, {len(report.models)} models ({report.cost_note})"]
    for name, (c, q) in report.singles.items():
        lines.append(f"  {name:<48} accuracy {q:.3f}  cost {c:.4g}")
    lines += [
        f"best single model: {best}, accuracy {acc:.3f}",
        f"argmax router (highest predicted quality): accuracy {report.argmax_accuracy:.3f} "
        f"({100 * (report.argmax_accuracy - acc):+.1f} points)",
        f"router at the best single model's cost ({cost:.4g}): "
        f"{report.gain_at_best_cost:+.1f} points",
        f"oracle: accuracy {report.oracle[1]:.3f} at cost {report.oracle[0]:.4g}",
        f"mean quality over the single models' cost range: router {report.area_router:.3f}, "
        f"mixtures {report.area_singles:.3f}",
    ]
    return lines


def run_nway_labels(args: argparse.Namespace) -> Calibration:
    """``calibrate --labels F --models a,b,c``: the N-way model on every labelled prompt, with
    the percentile calibration on the same prompts' features."""
    data = _read(args, args.outcomes)
    costs, unit, note = nway_costs(args, data)
    probe = build_probe(args)
    print(f"{len(data)} labelled prompts, {len(data.models)} models; probing (cached) ...")
    X, names, table = nway_features(probe, data, args.features_cache, args.features)
    model = fit_nway(X, names, data, costs, cost_unit=unit, link=args.link, seed=args.seed)
    print(f"N-way model: {len(names)} features, {args.link} heads, L2 {model.l2:g}; costs: {note}")
    cv = model.cv
    if cv:
        print(
            f"{int(cv['folds'])}-fold CV: argmax accuracy {cv['argmax_accuracy']:.3f}, best "
            f"single model {cv['best_single_accuracy']:.3f}, oracle {cv['oracle_accuracy']:.3f}"
        )
    return nway_calibration(
        probe, model, table, min_per_bucket=args.min_per_bucket, max_buckets=args.max_buckets
    )
