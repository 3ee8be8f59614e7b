"""``sparsity-router learn``: refit the supervised calibration on the labels the gateway
collected (or an exported labels file), compare it with the calibration serving on held-back
labels, write it, and optionally promote it (:mod:`evaluation.learning`).

::

    sparsity-router learn --config gw.yaml --events events.sqlite --out candidate.json \\
        [--holdout 0.2] [--promote swap --margin 0.02 --gateway URL --admin-key KEY]

``--promote swap`` replaces the serving calibration file (atomically) when the candidate's APGR
beats the current one's by ``--margin`` with a bootstrap 95% CI above 0, then asks the gateway to
reload (exit status 3 when it does not beat it). ``--promote experiment`` registers the
candidate as the challenger arm of an A/B experiment ``learn-<candidate id>`` on a virtual
model (control: its policy with the gateway's calibration; challenger: the same policy with
``calibration: <candidate>``, ``--challenger-share`` of the keys), writes that config to
``--write-config`` (default ``<config>.experiment.yaml``) after loading it as the gateway would,
or with ``--gateway`` replaces the gateway's own ``--config`` (atomically) and asks it to reload
(the previous file is put back when it refuses). ``sparsity-router experiments report`` then
compares the arms.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import httpx
import yaml

from cli.options import (
    add_config_argument,
    add_label_options,
    add_probe_options,
    build_probe,
    comma_list,
    positive_int,
    read_labels,
)
from evaluation.learning import (
    Comparison,
    check_label_count,
    compare,
    label_events,
    labels_outcomes,
    learn,
    load_candidate,
)
from evaluation.outcomes import OutcomeSet
from policies.errors import ConfigError
from policies.loader import load_settings, parse_settings
from policies.schema import Settings
from probes.calibration import Calibration
from probes.errors import CalibrationError
from router.events import open_sink

if TYPE_CHECKING:
    from probes.probe import SparsityProbe

__all__ = ["EXIT_NOT_PROMOTED", "EXPERIMENT_PREFIX", "register", "run"]

#: The exit status when ``--promote swap`` finds the candidate no better than the current one.
EXIT_NOT_PROMOTED: Final = 3

#: ``--promote experiment``'s experiments are named ``learn-<candidate id>``; a newer one on the
#: same virtual model replaces them.
EXPERIMENT_PREFIX: Final = "learn-"

#: Probe options that change what the probe measures: the config's probe decides with --config.
_PROBE_IDENTITY: Final = (
    "model",
    "layers",
    "metric",
    "layer",
    "position",
    "token_mean",
    "state_layers",
    "max_tokens",
    "system_prompt",
    "chat_template",
)


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share between 0 and 1 (e.g. 0.2)")
    return value


def register(subparsers: Any) -> None:
    """Add ``learn`` to the CLI's subparsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "learn",
        help="refit the supervised calibration on collected labels; compare; promote",
        description="Fit a supervised calibration on labels (the gateway's events or an "
        "exported file), score it and the calibration serving on the same held-back labels "
        "(APGR with a bootstrap CI of the difference), write it, and with --promote replace "
        "the serving file (then reload the gateway) or make it the challenger arm of an A/B "
        "experiment.",
    )
    add_config_argument(parser)
    source = parser.add_argument_group("labels")
    source.add_argument(
        "--events",
        metavar="PATH_OR_URL",
        help="the gateway's events: a SQLite or .jsonl file, or redis://HOST/DB (the stream "
        "--stream); default: the config's events section when --labels is not given",
    )
    source.add_argument(
        "--stream",
        metavar="KEY",
        help="with a redis --events URL: the stream (default: the config's events.stream)",
    )
    add_label_options(parser, flag="--labels", required=False)
    parser.add_argument(
        "--current",
        metavar="FILE",
        help="the calibration serving now (default: the config's calibration.path)",
    )
    parser.add_argument("--out", metavar="FILE", help="candidate JSON to write (required to fit)")
    parser.add_argument(
        "--candidate",
        metavar="FILE",
        help="compare (and promote) this calibration, e.g. an earlier --out, instead of fitting "
        "one: it is scored on every label, so give labels it was not fitted on",
    )
    parser.add_argument(
        "--holdout",
        type=_share,
        default=0.2,
        metavar="SHARE",
        help="labels held back to compare on (seeded by --seed; default 0.2)",
    )
    parser.add_argument(
        "--promote",
        choices=("swap", "experiment"),
        help="swap: replace the serving file when the candidate wins (exit 3 when not); "
        "experiment: make the candidate the challenger arm of an A/B experiment",
    )
    parser.add_argument(
        "--margin",
        type=float,
        default=0.02,
        metavar="X",
        help="least APGR gain for --promote swap (default 0.02)",
    )
    experiment = parser.add_argument_group("--promote experiment")
    experiment.add_argument(
        "--challenger-share",
        type=_share,
        default=0.1,
        metavar="SHARE",
        help="share of the keys the challenger arm gets (default 0.1)",
    )
    experiment.add_argument(
        "--virtual-model",
        metavar="NAME",
        help="the virtual model whose requests are split (default: auto, else the only one)",
    )
    experiment.add_argument(
        "--experiment-key",
        default="user",
        metavar="KEY",
        help="what assigns a request to an arm: user | api_key | header:<name> (default user)",
    )
    experiment.add_argument(
        "--write-config",
        metavar="FILE",
        help="where the config with the experiment goes (default: CONFIG.experiment.yaml next "
        "to --config; with --gateway, --config itself is replaced)",
    )
    parser.add_argument(
        "--gateway",
        metavar="URL",
        help="after the promotion, POST URL/admin/reload (e.g. http://gw:8000)",
    )
    parser.add_argument(
        "--admin-key",
        default=os.environ.get("SPARSITY_ROUTER_ADMIN_KEY"),
        metavar="KEY",
        help="an admin-scoped key for --gateway (default: $SPARSITY_ROUTER_ADMIN_KEY)",
    )
    parser.add_argument(
        "--features", type=comma_list, metavar="LIST", help="as calibrate --features"
    )
    parser.add_argument("--neighbours", metavar="LIST", help="as calibrate --neighbours")
    parser.add_argument(
        "--neighbours-k",
        type=positive_int,
        default=50,
        metavar="K",
        help="labelled prompts per neighbour vote (default 50, at most the labels less one)",
    )
    parser.add_argument(
        "--min-per-bucket",
        type=positive_int,
        default=50,
        metavar="N",
        help="least prompts per length bucket (default 50, at most the labels)",
    )
    parser.add_argument(
        "--resamples", type=positive_int, default=2000, metavar="N", help="bootstrap resamples"
    )
    add_probe_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Fit, compare, write and (with ``--promote``) promote; returns the exit status."""
    if args.answer_column:
        raise CalibrationError(
            "learn refits the prompt calibration (calibration.path). Fix: leave out "
            "--answer-column; fit a cascade's answer calibration with calibrate --labels "
            "--answer-column"
        )
    if args.events and args.outcomes:
        raise CalibrationError("give --events or --labels, not both")
    if bool(args.out) == bool(args.candidate):
        raise CalibrationError(
            "give --out FILE (fit a candidate and write it there) or --candidate FILE (compare "
            "one fitted earlier), one of the two"
        )
    settings = _settings(args)
    data = _read(args, settings)
    probe = _probe(args, settings)
    current_path = _current_path(args, settings)
    current = None
    if current_path is not None and current_path.is_file():
        current = Calibration.load(current_path, expect_fingerprint=probe.fingerprint())
    print(f"{len(data)} labelled prompts; probing (cached in the feature cache) ...", flush=True)
    if args.candidate:
        candidate = load_candidate(args.candidate, probe)
        check_label_count(len(data))
        comparison = compare(
            probe,
            data,
            candidate,
            current,
            cache=args.features_cache,
            resamples=args.resamples,
            seed=args.seed,
        )
        print("\n".join(comparison.lines()))
        return _promote(args, settings, probe, candidate, current, current_path, comparison)
    learned = learn(
        probe,
        data,
        current=current,
        holdout=args.holdout,
        seed=args.seed,
        cache=args.features_cache,
        features=args.features,
        neighbours=args.neighbours,
        k=args.neighbours_k,
        min_per_bucket=args.min_per_bucket,
        resamples=args.resamples,
    )
    print("\n".join(learned.comparison.lines()))
    candidate = learned.candidate
    out = candidate.save(args.out)
    print(f"wrote {out} (calibration {candidate.id}, refitted on all {len(data)} labels)")
    return _promote(args, settings, probe, candidate, current, current_path, learned.comparison)


def _promote(
    args: argparse.Namespace,
    settings: Settings | None,
    probe: SparsityProbe,
    candidate: Calibration,
    current: Calibration | None,
    current_path: Path | None,
    comparison: Comparison,
) -> int:
    source = Path(args.candidate or args.out)
    if args.promote == "swap":
        return _swap(args, settings, probe, candidate, current, current_path, comparison, source)
    if args.promote == "experiment":
        return _experiment(args, settings, probe, source, candidate, current)
    return 0


# -- inputs -------------------------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> Settings | None:
    return load_settings(args.config) if args.config else None


def _read(args: argparse.Namespace, settings: Settings | None) -> OutcomeSet:
    """The labels: --labels (an exported file), else the events (--events, else the config's)."""
    if args.outcomes:
        return read_labels(args)
    sink = _open_events(args, settings)
    try:
        labels = label_events(sink.read())
    except CalibrationError:
        raise
    except Exception as exc:
        raise CalibrationError(f"could not read labels from the events: {exc}") from exc
    finally:
        sink.close()
    found = labels_outcomes(labels)
    print(found.describe())
    if found.data is None:
        raise CalibrationError(
            f"no label with its prompt text among {found.read} label(s). Fix: set "
            "labelling.store_text: true in the gateway's config (or give --labels FILE)"
        )
    return found.data


def _open_events(args: argparse.Namespace, settings: Settings | None) -> Any:
    events = settings.events if settings is not None else None
    stream = args.stream or (events.stream if events is not None else "sparsity-router:events")
    where: str | None = args.events
    if where is None:
        if events is None or events.sink == "none":
            raise CalibrationError(
                "no labels to read. Fix: give --events PATH_OR_URL, --labels FILE, or --config "
                "with an events section"
            )
        if events.sink == "redis":
            where = events.redis_url
        else:
            where = str(settings.resolve_path(events.path)) if settings is not None else None
    assert where is not None
    if where.startswith(("redis://", "rediss://", "unix://")):
        return open_sink("redis", path=Path("."), redis_url=where, stream=stream, max_len=1)
    path = Path(where)
    if not path.is_file():
        raise CalibrationError(f"no events file at {path}. Fix: give the gateway's events.path")
    kind = "jsonl" if path.suffix == ".jsonl" else "sqlite"
    return open_sink(kind, path=path, redis_url=None, stream=stream, max_len=1)


def _probe(args: argparse.Namespace, settings: Settings | None) -> SparsityProbe:
    """The serving probe: the config's (with --config), else the probe options'."""
    if settings is None:
        return build_probe(args)
    given = [name for name in _PROBE_IDENTITY if getattr(args, name, None) is not None]
    if given:
        raise CalibrationError(
            f"--config sets the probe; the probe options {', '.join(given)} would measure "
            "something else. Fix: leave them out, or leave out --config"
        )
    from probes.probe import SparsityProbe

    return SparsityProbe(settings.probe.probe_settings())


def _current_path(args: argparse.Namespace, settings: Settings | None) -> Path | None:
    if args.current:
        return Path(args.current)
    return settings.calibration_path() if settings is not None else None


# -- promotion ----------------------------------------------------------------------------------


def _swap(
    args: argparse.Namespace,
    settings: Settings | None,
    probe: SparsityProbe,
    candidate: Calibration,
    current: Calibration | None,
    target: Path | None,
    comparison: Comparison,
    source: Path,
) -> int:
    """Replace the serving file when the candidate wins; then reload the gateway."""
    if target is None:
        raise CalibrationError(
            "--promote swap: no serving calibration file to replace. Fix: give --current FILE "
            "or --config with calibration.path"
        )
    ok, why = comparison.verdict(args.margin)
    if not ok:
        print(f"not promoted: {why}")
        return EXIT_NOT_PROMOTED
    if settings is not None:
        _check_serves(settings, probe, source)
    candidate.save(target)
    print(f"promoted: {why}; {target} is now calibration {candidate.id}")
    if args.gateway:
        return _reload(args, candidate, current, target)
    return 0


def _serving_probe(settings: Settings, probe: SparsityProbe) -> SparsityProbe:
    """The probe the gateway runs (the config's settings), sharing ``probe``'s loaded model."""
    from probes.probe import SparsityProbe

    return SparsityProbe(settings.probe.probe_settings(), loaded=probe.loaded)


def _check_serves(settings: Settings, probe: SparsityProbe, path: Path) -> None:
    """Refuse a candidate the gateway would refuse on reload (as build_state checks it)."""
    from router.state import load_calibrations  # imports torch (the probe model's loader)

    section = settings.calibration.model_copy(update={"path": str(path.resolve())})
    try:
        load_calibrations(
            settings.model_copy(update={"calibration": section}), _serving_probe(settings, probe)
        )
    except CalibrationError as exc:
        raise CalibrationError(f"the gateway would refuse the candidate: {exc}") from None


def _ask_reload(args: argparse.Namespace) -> tuple[int | None, str]:
    """POST /admin/reload: the status (None: no answer) and the gateway's message."""
    url = args.gateway.rstrip("/") + "/admin/reload"
    headers = {"authorization": f"Bearer {args.admin_key}"} if args.admin_key else {}
    try:
        response = httpx.post(url, headers=headers, timeout=60)
        answer: Any = response.json() if response.content else {}
    except (httpx.HTTPError, ValueError) as exc:
        return None, f"reloading the gateway at {url} failed ({exc}); reload it yourself"
    if response.status_code == 200:
        return 200, str(answer.get("message", ""))
    message = answer.get("error", {}).get("message", response.text) if answer else response.text
    return response.status_code, str(message)


def _reload(
    args: argparse.Namespace, candidate: Calibration, current: Calibration | None, target: Path
) -> int:
    """POST /admin/reload; when the gateway refuses, put the previous file back."""
    status, message = _ask_reload(args)
    if status is None:
        print(f"warning: {message}")
        return 1
    if status == 200:
        print(f"gateway reloaded: {message}")
        return 0
    if current is not None:
        current.save(target)
        restored = f"{target} restored to calibration {current.id}"
    else:
        restored = f"{target} holds the candidate {candidate.id}"
    print(f"the gateway refused the reload ({status}): {message}; {restored}")
    return 1


def _experiment(
    args: argparse.Namespace,
    settings: Settings | None,
    probe: SparsityProbe,
    source: Path,
    candidate: Calibration,
    current: Calibration | None,
) -> int:
    """Register the candidate as the challenger arm of experiment ``learn-<id>``: write the
    config (or, with --gateway, replace the gateway's own and reload it)."""
    if settings is None or not args.config:
        raise CalibrationError(
            "--promote experiment adds an experiment to the gateway's config. Fix: give --config"
        )
    config = Path(args.config)
    target = _experiment_target(args, config)
    model = _virtual_model(args, settings)
    policy = settings.virtual_models[model].policy
    name = f"{EXPERIMENT_PREFIX}{candidate.id}"
    original = config.read_text(encoding="utf-8")
    experiments, replaced = _experiments_with(original, settings, name, model, policy, args, source)
    text = _with_top_level(original, "experiments", experiments, name)
    served = _validate_experiment(text, target, config, probe)
    arm = next(e for e in served.experiments if e.name == name).arms[1]
    for old in replaced:
        print(f"replaced experiment {old} (virtual model {model!r}) with {name}")
    print(
        f"experiment {name} on virtual model {model!r} (key {args.experiment_key}), policy "
        f"{policy!r}: control {1 - args.challenger_share:.0%} with the gateway's calibration "
        f"({current.id if current is not None else 'none'}), challenger "
        f"{args.challenger_share:.0%} with calibration {candidate.id} ({arm.calibration})"
    )
    report = (
        f"Compare the arms once traffic has flowed: sparsity-router experiments report {name} "
        f"--config {target} --out DIR (requests, latency, cost and feedback per arm; events "
        "carry each request's arm and calibration). When the challenger wins: sparsity-router "
        f"learn --config {target} --candidate {source} --promote swap, then remove {name}."
    )
    if not args.gateway:
        _write_atomically(target, text)
        print(
            f"wrote {target}: {config.name} with experiment {name}. Serve it (or reload a "
            f"gateway reading it).\n{report}"
        )
        return 0
    _write_atomically(config, text)
    status, message = _ask_reload(args)
    if status == 200:
        print(f"replaced {config}; gateway reloaded: {message}\n{report}")
        return 0
    if status is None:
        print(f"warning: {message} ({config} now holds experiment {name})")
        return 1
    _write_atomically(config, original)
    print(f"the gateway refused the reload ({status}): {message}; {config} restored")
    return 1


def _experiment_target(args: argparse.Namespace, config: Path) -> Path:
    """Where the config with the experiment goes: --config itself with --gateway, else
    --write-config (never --config), by default CONFIG.experiment.yaml beside it."""
    if args.gateway:
        if args.write_config and Path(args.write_config).resolve() != config.resolve():
            raise CalibrationError(
                "--gateway replaces the gateway's own config (--config) and reloads it. Fix: "
                "leave out --write-config, or --gateway to only write the file"
            )
        return config
    target = Path(args.write_config or config.with_name(f"{config.stem}.experiment.yaml"))
    if target.resolve() == config.resolve():
        raise CalibrationError(
            f"--write-config {target} is --config itself, which learn does not overwrite "
            "without --gateway. Fix: write another file, or give --gateway URL to replace the "
            "gateway's config and reload it"
        )
    if target.resolve().parent != config.resolve().parent:
        raise CalibrationError(
            f"--write-config {target}: write it in {config.parent} beside {config.name}, "
            "whose relative paths (calibration.path, events.path) are taken from its folder"
        )
    return target


def _virtual_model(args: argparse.Namespace, settings: Settings) -> str:
    """The virtual model whose requests the experiment splits."""
    models = settings.virtual_models
    if args.virtual_model is not None:
        if args.virtual_model not in models:
            raise CalibrationError(
                f"--virtual-model {args.virtual_model!r} is not a virtual model of the config; "
                f"known: {', '.join(sorted(models))}"
            )
        return str(args.virtual_model)
    if "auto" in models:
        return "auto"
    if len(models) == 1:
        return next(iter(models))
    raise CalibrationError(
        f"the config has several virtual models ({', '.join(sorted(models))}). Fix: name the "
        "one to split with --virtual-model NAME"
    )


def _experiments_with(
    text: str,
    settings: Settings,
    name: str,
    model: str,
    policy: str,
    args: argparse.Namespace,
    source: Path,
) -> tuple[list[Any], list[str]]:
    """The ``experiments`` list with experiment ``name`` (control: ``policy`` with the gateway's
    calibration; challenger: the same with ``source``), and the names of earlier ``learn-``
    experiments it replaces. Another experiment on ``model`` is an error (one per model)."""
    raw = yaml.safe_load(text) or {}
    listed = raw.get("experiments") if isinstance(raw, dict) else None
    kept: list[Any] = []
    replaced: list[str] = []
    for i, experiment in enumerate(settings.experiments):
        same_model = experiment.model == model
        if experiment.name == name or (
            same_model and experiment.name.startswith(EXPERIMENT_PREFIX)
        ):
            replaced.append(experiment.name)
        elif same_model:
            raise CalibrationError(
                f"virtual model {model!r} already runs experiment {experiment.name!r} "
                f"(experiments[{i}]), and a virtual model has one experiment at a time. Fix: "
                "end it (remove it from the config) first, or split another model with "
                "--virtual-model"
            )
        else:
            kept.append(listed[i] if isinstance(listed, list) else experiment.model_dump())
    share = args.challenger_share
    arms = [
        {"name": "control", "policy": policy, "weight": round(1.0 - share, 9)},
        {
            "name": "challenger",
            "policy": policy,
            "weight": share,
            "calibration": str(source.resolve()),
        },
    ]
    new = {"name": name, "model": model, "key": args.experiment_key, "control": "control"}
    return [*kept, {**new, "arms": arms}], replaced


def _with_top_level(text: str, key: str, value: Any, name: str) -> str:
    """``text`` with its top-level ``key`` block replaced by ``key: value`` (appended when it
    has none); the rest of the file, comments included, is left as it was."""
    lines = text.splitlines(keepends=True)
    marker = f"# {key}: "
    block = (
        f"{marker}{name} added by sparsity-router learn --promote experiment\n"
        + yaml.safe_dump({key: value}, sort_keys=False)
    )
    start = next((i for i, line in enumerate(lines) if re.match(rf"{key}\s*:", line)), None)
    if start is None:
        return text + ("\n" if text and not text.endswith("\n") else "") + block
    end = start + 1
    while end < len(lines) and _continues(lines[end]):
        end += 1
    while end > start + 1 and (not lines[end - 1].strip() or lines[end - 1].startswith("#")):
        end -= 1  # comments and blank lines before the next key stay with it
    if start > 0 and lines[start - 1].startswith(marker):
        start -= 1  # the marker of an earlier promotion
    return "".join([*lines[:start], block, *lines[end:]])


def _continues(line: str) -> bool:
    """Whether ``line`` belongs to the top-level block above it: blank, a comment, indented,
    or an item of a block sequence written at column 0."""
    return not line.strip() or line[0] in " \t#" or line.startswith("- ") or line.strip() == "-"


def _validate_experiment(text: str, target: Path, config: Path, probe: SparsityProbe) -> Settings:
    """Load ``text`` as the gateway would from ``target`` (schema, cross-checks, and the arm
    calibrations checked against the probe); CalibrationError names the problem."""
    from router.state import load_arm_calibrations  # imports torch (the probe model's loader)

    try:
        served = parse_settings(text, source_name=str(target), base_dir=config.resolve().parent)
    except ConfigError as exc:
        raise CalibrationError(f"the config with the experiment would not load:\n{exc}") from None
    try:
        load_arm_calibrations(served, _serving_probe(served, probe))
    except CalibrationError as exc:
        raise CalibrationError(f"the gateway would refuse the experiment: {exc}") from None
    return served


def _write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (a temporary file in its folder renamed into place; the
    file's mode kept)."""
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
