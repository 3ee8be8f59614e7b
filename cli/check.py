"""``sparsity-router check [CONFIG] [--ping]``: validate a config file (``CONFIG`` or
``--config CONFIG``, else ``$SPARSITY_ROUTER_CONFIG``, else the embedded one); with ``--ping``
also reach every backend's ``/v1/models``.

Exit status 0 when valid (and reachable), 1 when a backend or a calibration file is missing, 2
when the file is invalid (a ConfigError, printed by :func:`cli.main.main`). Loads no torch.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from cli.options import add_config_argument
from policies.loader import env_value, load_settings, resolve_config_path
from policies.schema import LocalBackend as LocalBackendSettings
from policies.schema import OpenAIBackend as OpenAIBackendSettings
from policies.schema import Settings
from router.backends.openai import OpenAIBackend
from router.errors import UpstreamError
from router.escalations.config import describe_human

__all__ = ["check_config", "register", "run"]


def register(subparsers: Any) -> None:
    """Add ``check`` to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "check",
        help="validate a config file",
        description="Validate a YAML config; with --ping, also reach every backend's /v1/models. "
        "Exit status 0 when valid (and reachable), 1 when a backend or the calibration file is "
        "missing, 2 when the file is invalid.",
    )
    add_config_argument(parser)
    parser.add_argument("--ping", action="store_true", help="reach every backend")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Validate the config and print its summary."""
    lines, status = check_config(args.config, args.ping)
    print("\n".join(lines))
    return status


def _summary(settings: Settings, source: str) -> list[str]:
    lines = [f"{source}: valid"]
    for name, backend in settings.backends.items():
        if isinstance(backend, OpenAIBackendSettings):
            where = ", ".join(backend.base_urls)
            lines.append(
                f"  backend {name}: openai at {where}"
                + (f" as {backend.model}" if backend.model else "")
            )
        elif isinstance(backend, LocalBackendSettings):
            lines.append(f"  backend {name}: local {backend.model or settings.probe.model}")
        else:
            lines.append(f"  backend {name}: {describe_human(backend, settings)}")
        fallback = tuple(backend.fallback)
        if fallback:
            lines[-1] += f" (fallback: {', '.join(fallback)})"
    for model, vm in settings.virtual_models.items():
        lines.append(f"  model {model!r} -> policy {vm.policy}")
    for name, policy in settings.policies.items():
        rules = ", ".join(f"{r.name} -> {r.route}" for r in policy.rules) or "no rules"
        lines.append(
            f"  policy {name}: {rules}; default -> {policy.default.route}; "
            f"on probe error -> {policy.on_probe_error}"
        )
        cascade = policy.cascade
        if cascade is not None:
            lines[-1] += (
                f"; cascade: {cascade.backend}'s answers -> {cascade.escalate_to} when p_large "
                f"in {cascade.when.p_large.describe()}"
            )
    for what, path, fix in _calibrations(settings):
        state = "found" if path.is_file() else f"MISSING: fit it with sparsity-router {fix}"
        lines.append(f"  {what} {path} ({state})")
    return lines


def _calibrations(settings: Settings) -> list[tuple[str, Path, str]]:
    """(what, path, the command that fits it) of each configured calibration file."""
    out = []
    calibration = settings.calibration_path()
    if calibration is not None:
        out.append(("calibration", calibration, "calibrate"))
    answers = settings.answer_calibration_path()
    if answers is not None:
        out.append(("answer calibration", answers, "calibrate --labels FILE --answer-column NAME"))
    return out


async def _ping(settings: Settings) -> tuple[list[str], bool]:
    lines, ok = [], True
    for name, spec in settings.backends.items():
        if not isinstance(spec, OpenAIBackendSettings):
            lines.append(f"  ping {name}: in-process, nothing to reach")
            continue
        backend = OpenAIBackend(
            name,
            list(spec.base_urls),
            api_key=env_value(spec.api_key_env) if spec.api_key_env else None,
            connect_s=min(spec.timeouts.connect_s, 5.0),
            read_s=min(spec.timeouts.read_s, 10.0),
        )
        try:
            lines.append(f"  ping {name}: {await backend.ping()}")
        except UpstreamError as exc:
            ok = False
            lines.append(f"  ping {name}: FAILED {exc.message}")
        finally:
            await backend.aclose()
    return lines, ok


def check_config(config: str | None, ping: bool) -> tuple[list[str], int]:
    """Validate a config file (raises ConfigError); with ``ping``, reach every backend."""
    path = resolve_config_path(config)
    settings = load_settings(path)
    lines = _summary(settings, str(path))
    status = 0 if all(file.is_file() for _, file, _ in _calibrations(settings)) else 1
    if ping:
        ping_lines, ok = asyncio.run(_ping(settings))
        lines += ping_lines
        status = status or (0 if ok else 1)
    return lines, status
