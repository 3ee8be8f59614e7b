"""N-way routing on RouterDC's in-distribution sets: does the probe pick the right one of seven
7-8B models per prompt?

Run: ``.venv/bin/python bench/nway.py [--data DIR] [--sample N | SET=N,...] [--compare-links]``

Reads RouterDC's five training files under ``DIR/routerdc/`` (``mmlu_train.json``,
``gsm8k-train.json``, ``arc_challenge_train.json``, ``humaneval_train.json``,
``cmmlu_train.json``; each a list of ``{"question", "scores": {model: quality}}`` for the same
seven models), takes the probe's features from the ``sparsity-router eval`` feature cache
(computing what is missing: the bundled probe, the supervised recipe's features) and
cross-validates the N-way model (:func:`evaluation.nway.evaluate_nway`, 5 folds over prompts,
ridge heads, L2 by inner CV) on each set alone.

RouterDC compares accuracy only, so the headline is the accuracy of the argmax router (each
prompt to the model with the highest predicted quality) against the best single model. For the
cost curve, a model's cost is its parameter count in billions (the Mistral-7B family 7.24, the
Llama-3-8B family 8.03): a stand-in for the price of serving it, documented in docs/routing.md.

Writes ``bench/results/nway.md`` (the table and the command) and ``bench/results/nway.png``
(quality against cost per set); ``--out DIR`` elsewhere.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import json
import time

import numpy as np
from numpy.typing import NDArray

from bench._data import add_data_argument, data_root
from evaluation.nway import (
    NWayData,
    NWayReport,
    concat_nway,
    draw_nway,
    evaluate_nway,
    nway_features,
    read_nway,
)

FloatArray = NDArray[np.float64]

#: RouterDC's in-distribution training files (note gsm8k's hyphen).
SETS = {
    "MMLU": "mmlu_train.json",
    "GSM8K": "gsm8k-train.json",
    "ARC-C": "arc_challenge_train.json",
    "HumanEval": "humaneval_train.json",
    "CMMLU": "cmmlu_train.json",
}
#: Parameter counts in billions: the cost stand-in.
PARAMS_B = {"meta-llama/Meta-Llama-3-8B": 8.03, "cognitivecomputations/dolphin-2.9-llama3-8b": 8.03}
MISTRAL_B = 7.24
RESULTS = Path(__file__).resolve().parent / "results"


def samples(text: str) -> dict[str, int]:
    """``400`` (every set) or ``MMLU=400,CMMLU=400``: set -> sample size ("*": every set)."""
    if "=" not in text:
        return {"*": int(text)}
    out = {}
    for item in text.split(","):
        name, _, n = item.partition("=")
        if name not in SETS:
            raise argparse.ArgumentTypeError(f"unknown set {name!r}; sets: {', '.join(SETS)}")
        out[name] = int(n)
    return out


def costs(models: tuple[str, ...]) -> list[float]:
    return [PARAMS_B.get(m, MISTRAL_B) for m in models]


def short(model: str) -> str:
    return model.split("/")[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_argument(parser)
    parser.add_argument(
        "--sample",
        type=samples,
        default={},
        help="a seeded sample of N prompts of every set (N), or of some (MMLU=400,CMMLU=400)",
    )
    parser.add_argument(
        "--sets", default=",".join(SETS), help="comma-separated, of " + ", ".join(SETS)
    )
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="fold seed (samples: seed 0)")
    parser.add_argument("--cache", type=Path, help="feature cache (default: eval's)")
    parser.add_argument(
        "--compare-links",
        action="store_true",
        help="also cross-validate logistic heads (on the soft labels, L2 100) against ridge",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where nway.md/png go")
    args = parser.parse_args(argv)

    from probes.probe import SparsityProbe
    from probes.types import ProbeSettings

    root = data_root(args.data) / "routerdc"
    probe = SparsityProbe(ProbeSettings())
    reports: dict[str, NWayReport] = {}
    datas: dict[str, NWayData] = {}
    features: dict[str, FloatArray] = {}
    logit: dict[str, NWayReport] = {}
    timings: dict[str, float] = {}
    for name in args.sets.split(","):
        data = read_nway(root / SETS[name], sample=args.sample.get(name, args.sample.get("*")))

        start = time.perf_counter()
        X, _, _ = nway_features(probe, data, args.cache)
        datas[name], features[name] = data, X
        features_s = time.perf_counter() - start
        start = time.perf_counter()
        note = "billions of parameters"
        vec = costs(data.models)
        reports[name] = evaluate_nway(
            X, data, vec, folds=args.folds, seed=args.seed, cost_note=note
        )
        if args.compare_links:
            # a fixed L2: an inner CV of logistic heads costs ~25 s a fit on 1,263 features
            logit[name] = evaluate_nway(
                X,
                data,
                vec,
                folds=args.folds,
                seed=args.seed,
                link="logit",
                l2=100.0,
                cost_note=note,
            )
        timings[name] = time.perf_counter() - start
        print(
            f"{name}: {len(data)} prompts, {X.shape[1]} features "
            f"(features {features_s:.0f} s, CV {timings[name]:.0f} s)",
            flush=True,
        )
    mixed = ""
    if len(datas) > 1:
        mixed = mixed_table(datas, features, args)
        print(mixed)
    table = markdown(reports, logit)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python bench/nway.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    (args.out / "nway.md").write_text(page(table, command, reports, mixed))
    (args.out / "nway.json").write_text(
        json.dumps({k: r.to_json() for k, r in reports.items()}, indent=1) + "\n"
    )
    plot(reports, args.out / "nway.png")
    print(f"wrote {args.out / 'nway.md'}, nway.json and nway.png")
    return 0


def markdown(reports: dict[str, NWayReport], logit: dict[str, NWayReport]) -> str:
    head = (
        "| set | n | best single model | its accuracy | argmax router | gain (points) | "
        "router at best single's cost (points) | oracle |"
    )
    if logit:
        head += " argmax, logistic heads |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in reports.items():
        best, acc, _ = r.best_single
        row = (
            f"| {name} | {r.n} | {short(best)} | {acc:.3f} | {r.argmax_accuracy:.3f} | "
            f"{100 * (r.argmax_accuracy - acc):+.1f} | {r.gain_at_best_cost:+.1f} | "
            f"{r.oracle[1]:.3f} |"
        )
        if logit:
            row += f" {logit[name].argmax_accuracy:.3f} |"
        lines.append(row)
    if len(reports) > 1:
        mean = {
            k: sum(v) / len(v)
            for k, v in {
                "best": [r.best_single[1] for r in reports.values()],
                "argmax": [r.argmax_accuracy for r in reports.values()],
                "oracle": [r.oracle[1] for r in reports.values()],
            }.items()
        }
        lines.append(
            f"| average | | | {mean['best']:.3f} | {mean['argmax']:.3f} | "
            f"{100 * (mean['argmax'] - mean['best']):+.1f} | | {mean['oracle']:.3f} |"
            + (" |" if logit else "")
        )
    return "\n".join(lines)


def mixed_table(
    datas: dict[str, NWayData], features: dict[str, FloatArray], args: argparse.Namespace
) -> str:
    """RouterDC's protocol: one router for the tasks mixed; per-task accuracy of the router and
    of each single model, the best single model being the best on average over the tasks."""
    names = list(datas)
    data = concat_nway([datas[n] for n in names])
    X = np.concatenate([features[n] for n in names])
    task = np.concatenate([np.full(len(datas[n]), i) for i, n in enumerate(names)])
    report = evaluate_nway(
        X, data, costs(data.models), folds=args.folds, seed=args.seed, cost_note="params"
    )
    picked = data.scores[np.arange(len(data)), np.asarray(report.picks)]
    router = [float(picked[task == i].mean()) for i in range(len(names))]
    single = {
        m: [float(data.scores[task == i, j].mean()) for i in range(len(names))]
        for j, m in enumerate(data.models)
    }
    best = max(single, key=lambda m: float(np.mean(single[m])))
    oracle = data.scores.max(axis=1)
    rows = [
        ("probe N-way, argmax", router),
        (f"best single model ({short(best)})", single[best]),
        ("oracle", [float(oracle[task == i].mean()) for i in range(len(names))]),
    ]
    head = "| router (one for all tasks) | " + " | ".join(names) + " | average |"
    lines = [head, "|" + "---|" * (len(names) + 2)]
    for label, values in rows:
        cells = " | ".join(f"{100 * v:.2f}" for v in values)
        lines.append(f"| {label} | {cells} | {100 * float(np.mean(values)):.2f} |")
    gain = 100 * (float(np.mean(router)) - float(np.mean(single[best])))
    lines.append("")
    lines.append(
        f"Gain of the argmax router over the best single model on average: {gain:+.2f} points "
        f"({len(data)} prompts, {args.folds}-fold CV over the mixed prompts)."
    )
    return "\n".join(lines)


def page(table: str, command: str, reports: dict[str, NWayReport], mixed: str = "") -> str:
    shares = []
    for name, r in reports.items():
        top = sorted(r.argmax_share.items(), key=lambda kv: -kv[1])[:3]
        shares.append(f"- {name}: " + ", ".join(f"{short(m)} {s:.0%}" for m, s in top))
    return (
        "# N-way routing on RouterDC's in-distribution sets\n\n"
        f"Command: `{command}` (bench/nway.py; 5-fold CV over prompts, ridge heads on the "
        "supervised recipe's probe features, L2 by inner CV). Accuracy is RouterDC's score "
        '(mean correctness per prompt); "argmax router" sends each prompt to the model with '
        "the highest predicted quality; the oracle takes the best model per prompt. Costs for "
        "the curve (nway.png, nway.json): parameter counts in billions.\n\n"
        "## RouterDC's protocol: one router for the tasks mixed (accuracy, %)\n\n"
        f"{mixed}\n\n"
        "## Each task alone\n\n"
        f"{table}\n\n"
        "Where the argmax router sends prompts (its three most chosen models):\n\n"
        + "\n".join(shares)
        + "\n\nRouterDC's own numbers and how these compare: docs/routing.md, N-way routing.\n"
    )


def plot(reports: dict[str, NWayReport], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(4.2 * len(reports), 4), squeeze=False)
    for ax, (name, r) in zip(axes[0], reports.items(), strict=True):
        draw_nway(ax, r, f"{name} ({r.n} prompts)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
