"""The ``sparsity-router`` command line: the parser and :func:`main`.

Each command lives in its own module, which adds its parser with ``register(subparsers)`` and
sets ``handler`` (``Namespace -> exit status``); :data:`COMMANDS` lists them:

``sparsity-router serve`` / ``sparsity-router check`` (:mod:`cli.serve`, :mod:`cli.check`)
    Run the gateway / validate a config file.
``sparsity-router probe TEXT... | --file F [--json] [--calibration C]`` (:mod:`cli.probe`)
    Measure prompts with the probe and print a table (or JSON Lines with ``--json``).
``sparsity-router calibrate --reference F --out calib.json [--plot calib.png]``
    Fit a calibration (score percentiles per length bucket) on reference prompts; with
    ``--labels F`` also a supervised P(large model does better) model (:mod:`cli.calibrate`).
``sparsity-router experiments report NAME`` (:mod:`cli.experiments`)
    Compare the arms of an A/B experiment from the event records.
``sparsity-router eval --data F`` (:mod:`cli.eval`)
    Score the configured router and baselines on outcome data.
``sparsity-router learn --events F --out candidate.json [--promote swap]`` (:mod:`cli.learn`)
    Refit the supervised calibration on the labels the gateway collected; compare it with the
    one serving on held-back labels; promote it.
``sparsity-router derive-probe [CONFIG] [--name | --command]`` (:mod:`cli.derive`)
    Build the model folder a vLLM server runs for the configured remote probe.

``probe``, ``calibrate`` and ``eval`` take the probe options (``--model``, ``--layers``,
``--metric``, ``--layer``, ...; :mod:`cli.options`). Every :class:`~probes.errors.RouterError`
is printed as ``error: <message>`` on stderr with exit status 2, never as a traceback. Nothing
heavy is imported with this module: torch and transformers load when a handler builds the probe.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from cli import calibrate, check, derive, experiments, learn, nway, probe, serve
from cli import eval as eval_command
from cli.options import EXIT_USAGE, Handler
from probes.errors import RouterError

__all__ = ["COMMANDS", "build_parser", "main"]

#: Functions that each register a command, in the order ``--help`` lists them.
COMMANDS: tuple[Callable[[Any], None], ...] = (
    serve.register,
    check.register,
    probe.register,
    calibrate.register,
    experiments.register,
    eval_command.register,
    nway.register,
    learn.register,
    derive.register,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``sparsity-router`` parser with every command of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="sparsity-router",
        description="An LLM gateway that routes requests by the activation sparsity of a "
        "small probe model.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)"
    )
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, title="commands"
    )
    for register in COMMANDS:
        register(subparsers)
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("sparsity-router")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 for usage errors and RouterErrors)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE if exc.code else 0
    _configure_logging(args.verbose)
    handler: Handler = args.handler
    try:
        return handler(args)
    except RouterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `sparsity-router probe ... | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _configure_logging(verbose: int) -> None:
    if verbose <= 0:
        return
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


if __name__ == "__main__":
    raise SystemExit(main())
