"""Options and steps shared by the ``sparsity-router`` commands.

- argument types: :func:`layer_list`, :func:`positive_int`;
- the config file: :func:`add_config_argument` (``CONFIG`` or ``--config CONFIG``);
- the probe options (:func:`add_probe_options`) and :func:`build_probe`, which loads the probe
  model they describe (torch and transformers are imported there, not with this module);
- prompt files (:func:`add_input_options`, :func:`read_input_file`);
- outcome data (:func:`add_label_options`, :func:`label_sources`, :func:`read_labels`), read
  by ``eval`` and ``calibrate --labels``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from pydantic import ValidationError

from evaluation.outcomes import (
    DEFAULT_LARGE,
    DEFAULT_PROMPT,
    DEFAULT_SMALL,
    OutcomeSet,
)
from evaluation.sources import SourceSpec, load_manifest, parse_source, read_sources
from probes.errors import CalibrationError, ProbeInputError
from probes.inputs import read_inputs
from probes.types import ProbeInput, ProbeSettings

if TYPE_CHECKING:
    from probes.probe import SparsityProbe

__all__ = [
    "EXIT_USAGE",
    "Handler",
    "add_config_argument",
    "add_features_cache_option",
    "add_input_options",
    "add_label_options",
    "add_probe_options",
    "build_probe",
    "comma_list",
    "label_sources",
    "layer_list",
    "positive_int",
    "read_input_file",
    "read_label_sources",
    "read_labels",
]

#: A command's handler: parsed arguments -> exit status.
Handler = Callable[[argparse.Namespace], int]

#: The exit status of usage errors and RouterErrors.
EXIT_USAGE: Final = 2

#: ProbeSettings field -> the CLI option that sets it (for error messages).
_OPTION_OF: Final = {
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


def layer_list(text: str) -> tuple[int, ...]:
    """``"1,8,-1"`` -> ``(1, 8, -1)`` (an argparse type)."""
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


def positive_int(text: str) -> int:
    """An integer of at least 1 (an argparse type)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def add_features_cache_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--features-cache DIR``: where probe features of outcome prompts are cached."""
    parser.add_argument(
        "--features-cache",
        type=Path,
        metavar="DIR",
        help="probe feature cache (default: ~/.cache/sparsity-router/eval)",
    )


def comma_list(text: str) -> tuple[str, ...]:
    """A comma-separated list of names: features, models (an argparse type; blanks dropped)."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


# -- the config file --------------------------------------------------------------------------


class _ConfigAction(argparse.Action):
    """Stores ``config`` from the positional ``CONFIG`` or from ``--config``; both naming
    different files is a usage error."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        if values is None:  # the positional left out
            return
        value = str(values)
        given = option_string or "CONFIG"
        current: str | None = getattr(namespace, self.dest, None)
        source: str | None = getattr(namespace, "_config_given_as", None)
        if current is not None and os.path.abspath(current) != os.path.abspath(value):
            parser.error(
                f"two different config files: {source} {current!r} and {given} {value!r}; "
                "give one (CONFIG or --config)"
            )
        setattr(namespace, self.dest, value)
        namespace._config_given_as = given


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """The config file, as the positional ``CONFIG`` or ``--config CONFIG`` (``args.config``,
    None when neither is given: :func:`policies.loader.resolve_config_path` then reads
    ``$SPARSITY_ROUTER_CONFIG``, else the embedded default)."""
    help_text = "YAML config (default: $SPARSITY_ROUTER_CONFIG, else the embedded one)"
    parser.add_argument(
        "config", nargs="?", metavar="CONFIG", action=_ConfigAction, default=None, help=help_text
    )
    parser.add_argument(
        "--config",
        dest="config",
        metavar="CONFIG",
        action=_ConfigAction,
        default=None,
        help="the same as CONFIG",
    )


# -- the probe --------------------------------------------------------------------------------


def add_probe_options(parser: argparse.ArgumentParser) -> None:
    """Options that build the probe; shared by every command that measures prompts."""
    group = parser.add_argument_group("probe options (must match the calibration's)")
    group.add_argument(
        "--model",
        help="probe model: bundled:NAME, a local model folder, a .gguf file or a hub id "
        "(default: bundled:smollm2-135m-instruct)",
    )
    group.add_argument(
        "--layers",
        type=layer_list,
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
        type=layer_list,
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
        "--batch-size", type=positive_int, metavar="N", help="prompts per forward pass"
    )
    group.add_argument("--threads", type=positive_int, metavar="N", help="torch CPU threads")


def build_probe(args: argparse.Namespace) -> SparsityProbe:
    """Load the probe the probe options describe (ProbeInputError for invalid ones)."""
    from probes.probe import SparsityProbe

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


# -- prompt files -----------------------------------------------------------------------------


def add_input_options(parser: argparse.ArgumentParser, *, flag: str, required: bool) -> None:
    """``flag`` (a prompt file) and ``--column``."""
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


def read_input_file(path: str, column: str | None) -> list[ProbeInput]:
    """The prompts of a prompt file (see :func:`probes.inputs.read_inputs`)."""
    return read_inputs(path, column=column)


# -- outcome data -----------------------------------------------------------------------------


def add_label_options(
    parser: argparse.ArgumentParser, *, flag: str, required: bool, sources: bool = False
) -> None:
    """``--data``/``--labels`` (each ``FILE`` or ``FILE:key=value,...``,
    :func:`evaluation.sources.parse_source`), with ``sources`` a ``--sources`` manifest too, and
    the options that say how to read outcome files."""
    group = parser.add_argument_group("outcome data")
    group.add_argument(
        flag,
        dest="outcomes",
        action="append",
        required=required,
        metavar="FILE[:MAP]",
        help="CSV/JSONL/JSON (or a folder of them) with a prompt and both models' correctness; "
        "repeat to combine files. MAP sets this file's columns and name: "
        "FILE:prompt=question,small=scores.MODEL_A,large=scores.MODEL_B,answer=COL,name=NAME,"
        "group=GROUP (unset keys: the --*-column options)",
    )
    if sources:
        group.add_argument(
            "--sources",
            metavar="FILE",
            help="a YAML/JSON manifest: a list of sources {path, prompt, small, large, answer, "
            "name, group, exclude, sample}, paths relative to the manifest",
        )
    group.add_argument(
        "--prompt-column", default=DEFAULT_PROMPT, metavar="NAME", help="default: %(default)s"
    )
    group.add_argument(
        "--small-column",
        default=DEFAULT_SMALL,
        metavar="NAME",
        help="the small model's outcome (default: %(default)s, as in RouteLLM's files)",
    )
    group.add_argument(
        "--large-column",
        default=DEFAULT_LARGE,
        metavar="NAME",
        help="the large model's outcome (default: %(default)s)",
    )
    group.add_argument(
        "--answer-column",
        metavar="NAME",
        help="the small model's answer text: probe prompt + answer, i.e. evaluate/fit a cascade "
        "router that checks the small model's answer before returning it (RouteLLM: "
        f"{DEFAULT_SMALL}_response)",
    )
    group.add_argument(
        "--exclude",
        metavar="FILE",
        help="drop these prompts (JSONL with eval_prompt/prompt, or one per line), e.g. "
        "RouteLLM's contaminated_prompts.jsonl",
    )
    group.add_argument("--sample", type=int, metavar="N", help="a seeded random sample of N rows")
    group.add_argument("--seed", type=int, default=0, help="sampling and fold seed (default 0)")
    add_features_cache_option(group)


def label_sources(args: argparse.Namespace) -> list[SourceSpec]:
    """The outcome sources the :func:`add_label_options` options name (``--data``/``--labels``,
    then the ``--sources`` manifest's)."""
    specs = [parse_source(text) for text in args.outcomes or ()]
    manifest = getattr(args, "sources", None)
    if manifest:
        specs += load_manifest(manifest)
    if not specs:
        raise CalibrationError("no outcome data. Fix: give --data FILE or --sources FILE")
    return specs


def read_labels(args: argparse.Namespace) -> OutcomeSet:
    """The outcome data the :func:`add_label_options` options name."""
    return read_label_sources(args, label_sources(args))


def read_label_sources(args: argparse.Namespace, specs: Sequence[SourceSpec]) -> OutcomeSet:
    """The rows of ``specs``, their unset columns, ``--exclude``, ``--sample`` and ``--seed``
    from the :func:`add_label_options` options."""
    if args.sample is not None and args.sample < 2:
        raise CalibrationError(f"--sample {args.sample}: give at least 2")
    data = read_sources(
        specs,
        prompt=args.prompt_column,
        small=args.small_column,
        large=args.large_column,
        answer=args.answer_column,
        exclude=args.exclude,
        sample=args.sample,
        seed=args.seed,
    )
    if data.unscored:
        print(
            f"note: {data.unscored} rows left out: a model's outcome cell is empty",
            file=sys.stderr,
        )
    return data
