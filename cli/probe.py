"""``sparsity-router probe TEXT... | --file F [--json] [--calibration C]``: measure prompts with
the probe and print a table (or JSON Lines with ``--json``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from cli.options import add_input_options, add_probe_options, build_probe, read_input_file
from evaluation.tables import probe_feeding
from probes.calibration import Calibration
from probes.errors import ProbeInputError
from probes.types import ProbeInput, ProbeResult

if TYPE_CHECKING:
    from probes.probe import SparsityProbe

__all__ = ["PREVIEW_CHARS", "register", "run"]

#: Characters of each prompt shown in the table.
PREVIEW_CHARS: Final = 40


def register(subparsers: Any) -> None:
    """Add ``probe`` to the CLI's subparsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "probe",
        help="measure the sparsity of prompts",
        description="Measure prompts with the sparsity probe and print their scores.",
    )
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="prompts to probe")
    add_input_options(parser, flag="--file", required=False)
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per input per line"
    )
    parser.add_argument(
        "--calibration",
        metavar="FILE",
        help="calibration JSON (from `calibrate`) to add score percentiles",
    )
    add_probe_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Measure the prompts and print their scores."""
    inputs = _probe_inputs(args)
    calibration = Calibration.load(args.calibration) if args.calibration else None
    probe = build_probe(args)
    if calibration is not None:
        calibration.check_fingerprint(probe.fingerprint(), source=args.calibration)
        if calibration.supervised is not None:
            probe = probe_feeding(probe, calibration.supervised)
    results = probe.measure(inputs, progress=args.file is not None)
    if calibration is not None:
        results = [calibration.with_percentile(r) for r in results]
    if args.json:
        for index, result in enumerate(results):
            print(json.dumps({"input": index, **result.to_dict()}, ensure_ascii=False))
    else:
        print(_table(inputs, results, probe, calibration))
    return 0


def _probe_inputs(args: argparse.Namespace) -> list[ProbeInput]:
    if args.file is not None and args.texts:
        raise ProbeInputError("give prompts as TEXT arguments or with --file, not both")
    if args.file is not None:
        return read_input_file(args.file, args.column)
    if args.column is not None:
        raise ProbeInputError("--column applies to --file only. Fix: drop --column")
    if not args.texts:
        raise ProbeInputError(
            "nothing to probe. Fix: give TEXT arguments, e.g. sparsity-router probe "
            "'What is 2+2?', or --file FILE"
        )
    for index, text in enumerate(args.texts):
        if not text.strip():
            raise ProbeInputError(
                f"input {index} (argument {index + 1}) is empty: there is nothing to probe. "
                "Fix: pass non-empty text"
            )
    return list(args.texts)


def _preview(item: ProbeInput, width: int = PREVIEW_CHARS) -> str:
    if isinstance(item, str):
        text = item
    else:
        parts = [str(m.get("content") or "") for m in item if isinstance(m, Mapping)]
        text = f"[{len(item)} msg] " + " | ".join(p for p in parts if p)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(
    inputs: Sequence[ProbeInput],
    results: Sequence[ProbeResult],
    probe: SparsityProbe,
    calibration: Calibration | None,
) -> str:
    s = probe.settings
    position = s.score_position
    header = ["#", "input", "tokens", "score"]
    if calibration is not None:
        header.append("pct")
    supervised = calibration is not None and calibration.supervised is not None
    if supervised:
        header.append("p_large")
    header += [f"L{layer}" for layer in probe.layers]
    rows = []
    for index, (item, result) in enumerate(zip(inputs, results, strict=True)):
        row = [
            str(index),
            _preview(item),
            f"{result.n_tokens}{'*' if result.truncated else ''}",
            f"{result.score:.4f}",
        ]
        if calibration is not None:
            row.append("-" if result.percentile is None else f"{result.percentile:.3f}")
        if supervised:
            row.append("-" if result.p_large is None else f"{result.p_large:.3f}")
        row += [f"{result.value(layer, s.score_metric, position):.4f}" for layer in probe.layers]
        rows.append(row)
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(w) if c == 1 else cell.rjust(w)
            for c, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [
        f"score = {s.score_metric} at layer {probe.score_layer} ({position} token), "
        "higher = sparser; L<n> columns: "
        f"{s.score_metric} ({position} token) at layer n",
        line(header),
        *(line(r) for r in rows),
    ]
    if any(r.truncated for r in results):
        out.append(f"* truncated to the last {s.max_tokens} tokens")
    return "\n".join(out)
