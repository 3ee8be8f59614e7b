"""``sparsity-router experiments report NAME``: how the arms of an A/B experiment compare
(:mod:`evaluation.experiments`), printed as markdown and written to ``OUT/NAME.md`` and
``OUT/NAME.png``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from evaluation.experiments import (
    ReportError,
    build_report,
    plot_report,
    read_experiment_records,
    to_markdown,
)
from policies.loader import resolve_config_path

__all__ = ["register", "run_report"]


def register(subparsers: Any) -> None:
    """Add ``experiments report`` to the CLI's subparsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "experiments",
        help="A/B experiments: compare arms from the event records",
        description="A/B experiments defined in the config's `experiments` section.",
    )
    sub = parser.add_subparsers(dest="experiments_command", metavar="ACTION", required=True)
    report = sub.add_parser(
        "report",
        help="per-arm statistics and significance tests (markdown + PNG)",
        description="Per arm: requests, backend shares, latency p50/p95, cost per request, "
        "mean feedback with a 95%% bootstrap CI; Welch's t-test of each arm against the "
        "control, chi-square test of backend shares.",
    )
    report.add_argument("name", metavar="NAME", help="the experiment's name")
    report.add_argument(
        "--config",
        metavar="FILE",
        help="config file (default: $SPARSITY_ROUTER_CONFIG, else the embedded one)",
    )
    report.add_argument("--out", default=".", metavar="DIR", help="where NAME.md/.png go")
    report.add_argument("--control", metavar="ARM", help="arm to compare against")
    report.add_argument("--resamples", type=int, default=2000, metavar="N")
    report.add_argument("--seed", type=int, default=0)
    report.add_argument("--no-plot", action="store_true", help="skip the PNG")
    report.set_defaults(handler=run_report)


def run_report(args: argparse.Namespace) -> int:
    """Build the report of experiment ``NAME`` and write it."""
    if args.resamples < 1:
        raise ReportError(f"--resamples must be at least 1, got {args.resamples}")
    records, control, order = read_experiment_records(resolve_config_path(args.config), args.name)
    report = build_report(
        records,
        args.name,
        control=args.control or control,
        arm_order=order,
        resamples=args.resamples,
        seed=args.seed,
    )
    text = to_markdown(report)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"{args.name}.md"
    md.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {md}")
    if not args.no_plot:
        png = plot_report(report, out / f"{args.name}.png")
        print(f"wrote {png}")
    return 0
