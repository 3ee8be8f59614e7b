"""``sparsity-router derive-probe [CONFIG] [--name | --command]``: build the model folder a vLLM
server runs for the configuration's remote probe (``probe.backend: vllm``) and print its path.

One layer at the last token gives the layer folder a stock vLLM serves; anything more (several
layers, token means, hidden vectors: the supervised recipes) gives a feature folder for the
project's vLLM plugin (``plugins/vllm_probe``): :func:`probes.derived.derive_for_settings`.
``--name`` prints the served model name the gateway expects, ``--command`` the whole ``vllm
serve`` command line.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from cli.options import add_config_argument
from policies.loader import load_settings, resolve_config_path

__all__ = ["register", "run", "serve_command"]


def register(subparsers: Any) -> None:
    """Add ``derive-probe`` to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "derive-probe",
        help="build the folder a vLLM server runs for the remote probe",
        description="Build (once, in the model cache) the model folder a vLLM pooling server "
        "runs for the configuration's probe section, and print its path. A single layer at "
        "the last token needs a stock vLLM; several layers, token means or hidden vectors "
        "need the project's vLLM plugin (plugins/vllm_probe, installed by "
        "scripts/vllm_venv.sh).",
    )
    add_config_argument(parser)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--name", action="store_true", help="print the served model name")
    what.add_argument(
        "--command", action="store_true", help="print the vllm serve command line to run"
    )
    parser.set_defaults(handler=run)


def serve_command(path: str, name: str, features: bool) -> list[str]:
    """The ``vllm serve`` arguments for a derived folder (float32: the probe's numbers are)."""
    pooling = "MEAN" if features else "LAST"  # MEAN: vLLM computes every prompt token
    args = [
        "vllm",
        "serve",
        path,
        "--served-model-name",
        name,
        "--runner",
        "pooling",
        "--dtype",
        "float32",
        "--pooler-config",
        f'{{"pooling_type": "{pooling}", "use_activation": false}}',
    ]
    if features:
        return [*args, "--no-enable-prefix-caching", "--no-enable-chunked-prefill"]
    return [*args, "--convert", "embed"]


def run(args: argparse.Namespace) -> int:
    from probes.derived import FeatureModel, derive_for_settings  # torch, to write weights

    settings = load_settings(resolve_config_path(args.config))
    derived = derive_for_settings(settings.probe.probe_settings())
    if args.name:
        print(derived.name)
    elif args.command:
        features = isinstance(derived, FeatureModel)
        print(shlex.join(serve_command(str(derived.path), derived.name, features)))
    else:
        print(derived.path)
    return 0
