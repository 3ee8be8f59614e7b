"""The ``sparsity-router`` command line.

Subcommands are registered by small functions listed in :data:`COMMANDS`; each adds its parser
and sets ``handler`` (``Namespace -> exit status``). Now:

``sparsity-router serve`` / ``sparsity-router check`` (see :mod:`router.serve`)
    Run the gateway / validate a config file.
``sparsity-router probe TEXT... | --file F [--json] [--calibration C]``
    Measure prompts with the probe and print a table (or JSON Lines with ``--json``).
``sparsity-router calibrate --reference F --out calib.json [--plot calib.png]``
    Fit a calibration (score percentiles per length bucket) on reference prompts; with
    ``--labels F`` also a supervised P(large model does better) model (see router.eval_cli).
``sparsity-router eval --data F``
    Score the configured router and baselines on outcome data (see :mod:`router.evaluate`).

``probe`` and ``calibrate`` take the probe options (``--model``, ``--layers``, ``--metric``,
``--layer``, ...). Every :class:`~probes.errors.RouterError` is printed as ``error: <message>``
on stderr with exit status 2, never as a traceback. Nothing heavy is imported with this module;
torch and transformers load when the parser is built or a handler runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from probes.errors import CalibrationError, ProbeInputError, RouterError

if TYPE_CHECKING:
    from probes.calibration import Calibration
    from probes.probe import ProbeInput, ProbeResult, SparsityProbe

__all__ = [
    "COMMANDS",
    "add_calibrate_command",
    "add_eval_command",
    "add_experiments_commands",
    "add_gateway_commands",
    "add_probe_command",
    "build_parser",
    "main",
]

logger = logging.getLogger(__name__)

Handler = Callable[[argparse.Namespace], int]

EXIT_USAGE = 2
PREVIEW_CHARS = 40

#: ProbeSettings field -> the CLI option that sets it (for error messages).
_OPTION_OF = {
    "model": "--model",
    "device": "--device",
    "dtype": "--dtype",
    "layers": "--layers",
    "metrics": "--metric",
    "score_metric": "--metric",
    "score_layer": "--layer",
    "score_position": "--position",
    "token_mean": "--token-mean",
    "max_tokens": "--max-tokens",
    "batch_size": "--batch-size",
    "chat_template": "--no-chat-template",
    "system_prompt": "--system-prompt",
    "threads": "--threads",
}


# -- argument types ---------------------------------------------------------------------------


def _layer_list(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        layers = tuple(int(p) for p in parts)
    except ValueError:
        layers = ()
    if not layers:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of layer numbers (e.g. 1,8,-1)"
        )
    return layers


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


# -- parser -----------------------------------------------------------------------------------


def _add_probe_options(parser: argparse.ArgumentParser) -> None:
    """Options that build the probe; shared by every command that measures prompts."""
    group = parser.add_argument_group("probe options (must match the calibration's)")
    group.add_argument(
        "--model",
        help="probe model: bundled:NAME, a local model folder, a .gguf file or a hub id "
        "(default: bundled:smollm2-135m-instruct)",
    )
    group.add_argument(
        "--layers",
        type=_layer_list,
        metavar="LIST",
        help="layers to report, comma-separated; negative counts from the end (write "
        "--layers=-1,8 when the list starts with a minus) (default: the score layer)",
    )
    group.add_argument(
        "--metric",
        metavar="NAME",
        help="score metric: top1_energy (default), top5_energy, top10_energy, effective_rank, "
        "hoyer, gini or outlier_frac",
    )
    group.add_argument(
        "--layer", type=int, metavar="N", help="layer of the score (default: -1, the last)"
    )
    group.add_argument(
        "--position",
        choices=("last", "mean"),
        help="score at the last prompt token (default) or averaged over tokens",
    )
    group.add_argument(
        "--token-mean",
        action="store_true",
        default=None,
        help="also report every metric averaged over tokens",
    )
    group.add_argument(
        "--state-layers",
        type=_layer_list,
        metavar="LIST",
        help="also keep the hidden vectors (last token, token mean) of these layers, for a "
        "supervised model on the probe's states (default: none; with --calibration, what its "
        "supervised model reads)",
    )
    group.add_argument(
        "--max-tokens", type=int, metavar="N", help="keep the last N tokens (default 512)"
    )
    group.add_argument("--system-prompt", metavar="TEXT", help="system message to prepend")
    group.add_argument(
        "--no-chat-template",
        dest="chat_template",
        action="store_false",
        default=None,
        help="probe the raw text instead of applying the model's chat template",
    )
    group.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    group.add_argument("--dtype", help="auto (default), float32, bfloat16 or float16")
    group.add_argument(
        "--batch-size", type=_positive_int, metavar="N", help="prompts per forward pass"
    )
    group.add_argument("--threads", type=_positive_int, metavar="N", help="torch CPU threads")


def _add_input_options(parser: argparse.ArgumentParser, *, flag: str, required: bool) -> None:
    parser.add_argument(
        flag,
        required=required,
        metavar="FILE",
        help="prompts: .jsonl (prompt or messages per line), .csv (a prompt column) or text "
        "(one per line)",
    )
    parser.add_argument(
        "--column",
        "--field",
        dest="column",
        metavar="NAME",
        help="CSV column / JSON field holding the prompt (default: prompt)",
    )


def add_probe_command(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "probe",
        help="measure the sparsity of prompts",
        description="Measure prompts with the sparsity probe and print their scores.",
    )
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="prompts to probe")
    _add_input_options(parser, flag="--file", required=False)
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per input per line"
    )
    parser.add_argument(
        "--calibration",
        metavar="FILE",
        help="calibration JSON (from `calibrate`) to add score percentiles",
    )
    _add_probe_options(parser)
    parser.set_defaults(handler=_run_probe)


def add_calibrate_command(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "calibrate",
        help="fit score percentiles on reference prompts",
        description="Probe reference prompts and fit a calibration: the empirical score "
        "distribution per token-length bucket, used to turn scores into percentiles.",
    )
    _add_input_options(parser, flag="--reference", required=False)
    parser.add_argument("--out", required=True, metavar="FILE", help="calibration JSON to write")
    parser.add_argument("--plot", metavar="FILE", help="also draw the calibration as a PNG")
    parser.add_argument(
        "--min-per-bucket",
        type=_positive_int,
        default=50,
        metavar="N",
        help="least references per length bucket (default 50)",
    )
    parser.add_argument(
        "--max-buckets",
        type=_positive_int,
        default=8,
        metavar="N",
        help="most length buckets (default 8)",
    )
    from router.eval_cli import add_label_options

    add_label_options(parser, flag="--labels", required=False)
    parser.add_argument(
        "--features",
        type=lambda t: tuple(x.strip() for x in t.split(",") if x.strip()),
        metavar="LIST",
        help="with --labels: the supervised model's features, e.g. L10.gini.last,L28.top1_energy"
        ".mean,log_tokens (default: router.evaluate.default_recipe: supervised_features, or with "
        "--answer-column answer_features, layers 2-12 of 30 and layer 12's vectors)",
    )
    parser.add_argument(
        "--neighbours",
        metavar="LIST",
        help="with --labels: the hidden vectors whose nearest labelled prompts vote (one vote "
        "each, stacked with the regression), e.g. L12.state.mean,L18.state.mean; 'none' for the "
        "regression alone (default: the token mean at 40%% of the probe's depth, and from 2,500 "
        "labelled prompts on also the one at 60%%: router.evaluate.neighbour_blocks; with "
        "--answer-column only the one at 40%%)",
    )
    parser.add_argument(
        "--neighbours-k",
        type=_positive_int,
        default=50,
        metavar="K",
        help="with --labels: labelled prompts averaged per neighbour vote (default 50)",
    )
    _add_probe_options(parser)
    parser.set_defaults(handler=_run_calibrate)


def add_gateway_commands(subparsers: Any) -> None:
    """``serve`` and ``check``, defined in :mod:`router.serve` (imported only when the parser is
    built, so that ``import router.cli`` stays light)."""
    from router.serve import add_check_command, add_serve_command

    add_serve_command(subparsers)
    add_check_command(subparsers)


def add_experiments_commands(subparsers: Any) -> None:
    """``experiments report NAME``, defined in :mod:`router.report`."""
    from router.report import add_experiments_command

    add_experiments_command(subparsers)


def add_eval_command(subparsers: Any) -> None:
    """``eval``, defined in :mod:`router.eval_cli`."""
    from router.eval_cli import add_eval_command as add

    add(subparsers)


#: Functions that each register subcommands.
COMMANDS: tuple[Callable[[Any], None], ...] = (
    add_gateway_commands,
    add_probe_command,
    add_calibrate_command,
    add_experiments_commands,
    add_eval_command,
)


def build_parser() -> argparse.ArgumentParser:
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


# -- main -------------------------------------------------------------------------------------


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


# -- shared steps -----------------------------------------------------------------------------


def _build_probe(args: argparse.Namespace) -> SparsityProbe:
    from pydantic import ValidationError

    from probes.probe import ProbeSettings, SparsityProbe

    given = {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "layers": args.layers,
        "score_metric": args.metric,
        "score_layer": args.layer,
        "score_position": args.position,
        "token_mean": args.token_mean,
        "state_layers": args.state_layers,
        "max_tokens": args.max_tokens,
        "batch_size": args.batch_size,
        "chat_template": args.chat_template,
        "system_prompt": args.system_prompt,
        "threads": args.threads,
    }
    options = {k: v for k, v in given.items() if v is not None}
    if "layers" not in options and "score_layer" in options:
        options["layers"] = (options["score_layer"],)
    try:
        settings = ProbeSettings(**options)
    except ValidationError as exc:
        problems = "; ".join(_describe(err) for err in exc.errors())
        raise ProbeInputError(f"invalid probe options: {problems}") from None
    with _quiet_loading(enabled=args.verbose <= 0):
        return SparsityProbe(settings)


@contextlib.contextmanager
def _quiet_loading(*, enabled: bool) -> Iterator[None]:
    """Hide transformers' per-load progress bars ("Loading weights") unless -v is given."""
    if not enabled:
        yield
        return
    from transformers.utils import logging as transformers_logging

    hf_logging: Any = transformers_logging  # untyped functions
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _describe(err: Mapping[str, Any]) -> str:
    loc = err.get("loc") or ()
    field = str(loc[0]) if loc else ""
    message = str(err.get("msg", "")).removeprefix("Value error, ")
    option = _OPTION_OF.get(field)
    return f"{option}: {message}" if option else message


def _read_file(path: str, column: str | None) -> list[ProbeInput]:
    from probes.inputs import read_inputs

    return read_inputs(path, column=column)


# -- probe ------------------------------------------------------------------------------------


def _run_probe(args: argparse.Namespace) -> int:
    from probes.calibration import Calibration

    inputs = _probe_inputs(args)
    calibration = Calibration.load(args.calibration) if args.calibration else None
    probe = _build_probe(args)
    if calibration is not None:
        calibration.check_fingerprint(probe.fingerprint(), source=args.calibration)
        if calibration.supervised is not None:
            from router.eval_cli import probe_feeding

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
        return _read_file(args.file, args.column)
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


# -- calibrate --------------------------------------------------------------------------------


def _run_calibrate(args: argparse.Namespace) -> int:
    from probes.calibration import fit_calibration

    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise CalibrationError(
            "--plot needs matplotlib, which is not installed. Fix: pip install matplotlib, "
            "or leave out --plot"
        )
    if os.path.isdir(args.out):
        raise CalibrationError(f"--out {args.out} is a directory. Fix: give a file name")
    if args.outcomes:
        from router.eval_cli import run_calibrate_labels

        calibration = run_calibrate_labels(args, _build_probe)
        return _write_calibration(calibration, args)
    if not args.reference:
        raise CalibrationError(
            "nothing to fit. Fix: give --reference FILE (prompts) and/or --labels FILE "
            "(prompts with both models' outcomes)"
        )
    inputs = _read_file(args.reference, args.column)
    probe = _build_probe(args)
    calibration = fit_calibration(
        probe,
        inputs,
        min_per_bucket=args.min_per_bucket,
        max_buckets=args.max_buckets,
        progress=True,
    )
    return _write_calibration(calibration, args)


def _write_calibration(calibration: Calibration, args: argparse.Namespace) -> int:
    """Save the calibration to ``--out``, print its summary, and plot it with ``--plot``."""
    calibration.save(args.out)
    print(calibration.summary())
    print(f"wrote {args.out}")
    if args.plot:
        from probes.plots import plot_calibration

        plot_calibration(calibration, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
