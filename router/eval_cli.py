"""``sparsity-router eval`` and ``sparsity-router calibrate --labels`` (see :mod:`router.evaluate`).

Both read outcome data (:mod:`router.outcomes`) and probe its prompts once, at every layer of the
probe model, both positions, with the model's perplexity of the prompt and its hidden vectors at
the last layer, through the on-disk feature cache (:mod:`probes.features`): re-running either is
fast, and ``calibrate --labels`` after ``eval`` on the same prompts probes nothing.

With ``--answer-column`` the probe reads each prompt followed by the small model's answer (a
user/assistant conversation, :attr:`router.outcomes.OutcomeSet.probe_inputs`) instead of the
prompt: a cascade router, which checks the small model's answer before returning it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from probes.errors import CalibrationError

if TYPE_CHECKING:
    from probes.calibration import Calibration
    from probes.features import FeatureTable
    from probes.probe import ProbeInput, ProbeResult, SparsityProbe
    from probes.supervised import SupervisedModel
    from router.outcomes import OutcomeSet

__all__ = ["add_eval_command", "add_label_options", "probe_feeding", "run_calibrate_labels"]

logger = logging.getLogger(__name__)


def add_label_options(parser: argparse.ArgumentParser, *, flag: str, required: bool) -> None:
    """``--data``/``--labels`` and the options that say how to read outcome files."""
    from router.outcomes import DEFAULT_LARGE, DEFAULT_PROMPT, DEFAULT_SMALL

    group = parser.add_argument_group("outcome data")
    group.add_argument(
        flag,
        dest="outcomes",
        action="append",
        required=required,
        metavar="FILE",
        help="CSV/JSONL (or a folder of them) with a prompt and both models' correctness; "
        "repeat to combine files",
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
    group.add_argument(
        "--features-cache",
        type=Path,
        metavar="DIR",
        help="probe feature cache (default: ~/.cache/sparsity-router/eval)",
    )


def add_eval_command(subparsers: Any) -> None:
    from router.cli import _add_probe_options, _positive_int

    parser: argparse.ArgumentParser = subparsers.add_parser(
        "eval",
        help="score routers on outcome data (APGR, CPT, AUROC, curves)",
        description="Rank prompts with the configured probe and with baselines (random, "
        "length, perplexity, MiniLM-embedding logistic regression, supervised sparsity), "
        "and report quality vs share sent to the large model, APGR, CPT(50%), CPT(80%) "
        "and AUROC, trained routers by k-fold cross-validation.",
    )
    add_label_options(parser, flag="--data", required=True)
    parser.add_argument("--folds", type=_positive_int, default=5, help="CV folds (default 5)")
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
    _add_probe_options(parser)
    parser.set_defaults(handler=_run_eval)


def read_labels(args: argparse.Namespace) -> OutcomeSet:
    from router.outcomes import read_outcomes

    if args.sample is not None and args.sample < 2:
        raise CalibrationError(f"--sample {args.sample}: give at least 2")
    return read_outcomes(
        args.outcomes,
        prompt_col=args.prompt_column,
        small_col=args.small_column,
        large_col=args.large_column,
        answer_col=args.answer_column,
        exclude=args.exclude,
        sample=args.sample,
        seed=args.seed,
    )


def all_layer_probe(probe: SparsityProbe) -> SparsityProbe:
    """``probe`` measuring every layer, every metric and token means (same loaded model)."""
    from probes.metrics import METRIC_NAMES
    from probes.probe import SparsityProbe

    s = probe.settings
    settings = type(s)(
        model=s.model,
        device=s.device,
        dtype=s.dtype,
        max_tokens=s.max_tokens,
        batch_size=s.batch_size,
        chat_template=s.chat_template,
        system_prompt=s.system_prompt,
        threads=s.threads,
        metrics=METRIC_NAMES,
        layers=tuple(range(1, probe.n_layers + 1)),
        token_mean=True,
    )
    return SparsityProbe(settings, loaded=probe.loaded)


def probe_feeding(probe: SparsityProbe, model: SupervisedModel) -> SparsityProbe:
    """``probe`` also measuring what ``model`` reads (layers, token means, hidden vectors); the
    score and the fingerprint stay as they are."""
    from probes.probe import SparsityProbe
    from probes.supervised import required_probe

    need = required_probe([model])
    s = probe.settings
    layers = tuple(dict.fromkeys((*s.layers, *need["layers"])))
    states = tuple(dict.fromkeys((*s.state_layers, *need["state_layers"])))
    token_mean = s.token_mean or bool(need["token_mean"])
    if (layers, states, token_mean) == (s.layers, s.state_layers, s.token_mean):
        return probe
    update = {
        "layers": layers,
        "score_layer": probe.score_layer,
        "token_mean": token_mean,
        "state_layers": states,
    }
    return SparsityProbe(s.model_copy(update=update), loaded=probe.loaded)


def feature_table(
    probe: SparsityProbe,
    prompts: Sequence[ProbeInput],
    cache: Path | None,
    *,
    progress: bool = True,
    state_layers: Sequence[int] = (),
) -> FeatureTable:
    """Features of every layer (both positions, perplexity) for ``prompts`` (texts or chat
    conversations), and the hidden vectors of the last layer, of the default neighbour votes'
    layers and of ``state_layers``, via the cache (keyed by the rendered input)."""
    from probes.features import extract
    from router.evaluate import neighbour_layers

    full = all_layer_probe(probe)
    return extract(
        full,
        prompts,
        cache_dir=cache,
        progress=progress,
        batch_size=probe.settings.batch_size,
        state_layers=sorted({full.n_layers, *neighbour_layers(full.n_layers), *state_layers}),
    )


def _configured_scores(
    probe: SparsityProbe, table: FeatureTable, calibration: Calibration | None
) -> tuple[str, Any]:
    from probes.supervised import LENGTH_FEATURE

    if calibration is not None and calibration.supervised is not None:
        model = calibration.supervised
        cols = [
            np.log(np.maximum(table.n_tokens, 1.0)) if f == LENGTH_FEATURE else table.column(f)
            for f in model.features
        ]
        return "configured (p_large)", model.predict_matrix(np.column_stack(cols), table.states)
    s = probe.settings
    name = f"L{probe.score_layer}.{s.score_metric}.{s.score_position}"
    return f"configured ({name})", table.column(name)


def _run_eval(args: argparse.Namespace) -> int:
    from probes.calibration import Calibration
    from router.cli import _build_probe
    from router.evaluate import embed_minilm, evaluate, plot_report

    if args.folds < 2:
        raise CalibrationError("--folds must be at least 2")
    data = read_labels(args)
    if len(data) < 2 * args.folds:
        raise CalibrationError(
            f"{len(data)} prompts are too few for {args.folds}-fold CV. Fix: give more "
            "labelled prompts or lower --folds"
        )
    calibration = Calibration.load(args.calibration) if args.calibration else None
    reads = "prompt" if args.answer_column is None else "answer"
    model = calibration.supervised if calibration is not None else None
    if model is not None and model.reads != reads:
        raise CalibrationError(_reads_mismatch(args.calibration, model.reads))
    probe = _build_probe(args)
    if calibration is not None:
        calibration.check_fingerprint(probe.fingerprint(), source=args.calibration)
    print(f"{len(data)} labelled prompts; probing (cached in the feature cache) ...", flush=True)
    if reads == "answer":
        print(
            f"the probe reads each prompt plus the small model's answer ({args.answer_column}): "
            "a cascade router, checking that answer before returning it",
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
    report = evaluate(
        data,
        table,
        configured=_configured_scores(probe, table, calibration),
        embeddings=embeddings,
        folds=args.folds,
        seed=args.seed,
    )
    print(report.table())
    if args.plot:
        print(f"wrote {plot_report(report, args.plot)}")
    if args.json:
        payload = {
            "n": report.n,
            "folds": report.folds,
            "reads": reads,
            "small_accuracy": report.small_accuracy,
            "large_accuracy": report.large_accuracy,
            "routers": {
                r.name: {k: _finite(r.mean(k)) for k in ("apgr", "cpt50", "cpt80", "auroc")}
                | {"apgr_folds": [_finite(v) for v in r.apgr], "trained": r.trained}
                for r in report.routers
            },
        }
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


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


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _results_from_table(probe: SparsityProbe, table: FeatureTable) -> list[ProbeResult]:
    """Probe results as ``probe`` would have reported them, rebuilt from cached features."""
    from probes.metrics import METRICS, sparsity
    from probes.probe import ProbeResult

    s = probe.settings

    def raw(i: int, layer: int, metric: str, pos: str) -> float:
        oriented = float(table.values[i, table.names.index(f"L{layer}.{metric}.{pos}")])
        return oriented if METRICS[metric].higher_is_sparser else 1.0 - oriented

    out = []
    for i in range(len(table)):
        last = {la: {m: raw(i, la, m, "last") for m in s.metrics} for la in probe.layers}
        mean = (
            {la: {m: raw(i, la, m, "mean") for m in s.metrics} for la in probe.layers}
            if probe.token_mean
            else None
        )
        table_for_score = last if s.score_position == "last" else mean
        assert table_for_score is not None
        out.append(
            ProbeResult(
                n_tokens=int(table.n_tokens[i]),
                score=sparsity(s.score_metric, table_for_score[probe.score_layer][s.score_metric]),
                metrics=last,
                metrics_mean=mean,
                truncated=bool(table.truncated[i]),
            )
        )
    return out


def run_calibrate_labels(
    args: argparse.Namespace, build_probe: Callable[[argparse.Namespace], SparsityProbe]
) -> Calibration:
    """Fit the percentile calibration (on ``--reference``, else the labelled prompts) and the
    supervised P(large does better) model on ``--labels``; returns the combined calibration."""
    from probes.calibration import Calibration, fit_calibration
    from probes.features import (
        expand_features,
        is_state_feature,
        parse_feature,
        parse_state_feature,
    )
    from probes.supervised import LENGTH_FEATURE
    from router.evaluate import default_recipe, fit_supervised

    data = read_labels(args)
    if data.large_better.all() or not data.large_better.any():
        raise CalibrationError(
            "the labels need prompts where the large model did better and prompts where it did "
            "not: a supervised model cannot be fitted otherwise"
        )
    probe = build_probe(args)
    recipe = default_recipe(probe.n_layers, len(data), answers=data.answers is not None)
    features = tuple(args.features) if args.features else recipe.features
    needed_layers: set[int] = set()
    needed_states: set[int] = set()
    width = probe.loaded.hidden_size
    neighbours = _neighbour_option(args, recipe.votes)
    needed_states.update(layer for layer, _ in neighbours)
    try:
        features = expand_features(features, width)
        for f in features:
            if f == LENGTH_FEATURE:
                continue
            if is_state_feature(f):
                layer, _pos, index = parse_state_feature(f)
                if index >= width:
                    raise ValueError(
                        f"feature {f!r}: the probe's hidden vectors have {width} coordinates "
                        f"(0..{width - 1})"
                    )
                needed_states.add(layer)
                continue
            needed_layers.add(parse_feature(f)[0])
    except ValueError as exc:
        raise CalibrationError(f"--features: {exc}") from None
    out_of_range = sorted(
        {la for la in needed_layers if not 0 <= la <= probe.n_layers}
        | {la for la in needed_states if not 1 <= la <= probe.n_layers}
    )
    if out_of_range:
        raise CalibrationError(
            f"--features name layers {out_of_range}, outside 0..{probe.n_layers} of "
            f"{probe.settings.model}"
        )
    print(f"{len(data)} labelled prompts; probing (cached in the feature cache) ...", flush=True)
    if data.answers is not None:
        print(
            f"the probe reads each prompt plus the small model's answer ({args.answer_column}): "
            "this calibration is for a policy's cascade (config key calibration.answer_path) and "
            "cannot route prompts",
            flush=True,
        )
    table = feature_table(
        probe, data.probe_inputs, args.features_cache, state_layers=sorted(needed_states)
    )
    if neighbours and args.neighbours_k > len(data) - 1:
        raise CalibrationError(
            f"--neighbours-k {args.neighbours_k}: only {len(data)} labelled prompts. Fix: lower "
            "--neighbours-k or give more labels"
        )
    model = fit_supervised(
        table,
        data,
        [f for f in features if f != LENGTH_FEATURE],
        neighbours=[block for _, block in neighbours],
        k=args.neighbours_k,
        folds=5,
        seed=args.seed,
    )
    if data.answers is not None:
        model = model.model_copy(update={"reads": "answer"})
    # The probe that serves this calibration must measure the model's features.
    serving = probe_feeding(probe, model)
    if args.reference:
        from router.cli import _read_file

        base = fit_calibration(
            serving,
            _read_file(args.reference, args.column),
            min_per_bucket=args.min_per_bucket,
            max_buckets=args.max_buckets,
            progress=True,
        )
    else:
        base = Calibration.fit(
            _results_from_table(serving, table),
            serving.fingerprint(),
            min_per_bucket=args.min_per_bucket,
            max_buckets=args.max_buckets,
        )
    cv = model.cv
    print(
        f"supervised model: {len(model.features)} features, L2 {model.l2:g}, "
        f"{model.positives} of {model.n_train} prompts where the large model did better; "
        f"{int(cv.get('folds', 5))}-fold CV APGR {cv.get('apgr', math.nan):.3f}, "
        f"AUROC {cv.get('auroc', math.nan):.3f}, CPT(50%) {cv.get('cpt50', math.nan):.1%}"
    )
    if model.neighbours and model.stack is not None:
        a, *b, _ = model.stack
        for vote in model.neighbours:
            print(
                f"neighbour vote: {vote.block}, mean gain of the {vote.k} nearest of {vote.n} "
                "labelled prompts"
            )
        terms = " + ".join(
            f"{w:.2f} x {v.block} vote" for w, v in zip(b, model.neighbours, strict=True)
        )
        print(f"stacked as {a:.2f} x regression log-odds + {terms}")
    quant = ", ".join(f"{k} {v:.3f}" for k, v in model.p_quantiles.items())
    print(f"p_large on the labelled prompts: {quant}")
    s = serving.settings
    print(
        "serve it with probe settings layers: "
        f"[{', '.join(str(x) for x in sorted(s.layers))}], score_layer: {probe.score_layer}"
        + (", token_mean: true" if s.token_mean else "")
        + (
            f", state_layers: [{', '.join(str(x) for x in s.state_layers)}]"
            if s.state_layers
            else ""
        )
    )
    return base.model_copy(update={"supervised": model})


def _neighbour_option(args: argparse.Namespace, default: Sequence[str]) -> list[tuple[int, str]]:
    """(layer, block) per vote of ``--neighbours`` (a comma-separated list; ``default`` when not
    given; empty for 'none')."""
    from probes.features import parse_state_block

    given = getattr(args, "neighbours", None)
    text = given if given is not None else ",".join(default)
    if text.strip().lower() == "none":
        return []
    out: list[tuple[int, str]] = []
    items = [item.strip() for item in text.split(",")]
    for item in items:
        try:
            parsed = parse_state_block(item)
        except ValueError:
            parsed = None
        if parsed is None:
            raise CalibrationError(
                f"--neighbours {item!r} must name a hidden vector, 'L<layer>.state.<last|mean>' "
                "(e.g. L12.state.mean, or a list: L12.state.mean,L18.state.mean), or be 'none'"
            )
        if any(block == item for _, block in out):
            raise CalibrationError(f"--neighbours names {item} twice. Fix: name each block once")
        out.append((parsed[0], item))
    return out
