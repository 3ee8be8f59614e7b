"""The vLLM feature probe against the local probe on benchmark prompts, with real outcome labels.

Run::

    .venv/bin/python bench/vllm_equivalence.py [--data DIR] \
        [--markdown bench/results/vllm_equivalence.md]

One real vLLM server with the project's plugin (started here: scripts/vllm_serve.sh features)
runs the probe section of config/examples/vllm-cascade.yaml (both default recipes). Inputs, from
the benchmark data folder (--data / $SPARSITY_ROUTER_DATA, docs/benchmarks.md):

- **prompts**: MT-Bench's 80 first turns and RouteLLM's first 120 GSM8K questions (200);
- **answers**: RouteLLM's first 200 GSM8K questions with Mixtral-8x7B's answer, as a cascade's
  check reads them.

Every feature of both probes is compared (largest |local - vLLM| per kind), then P(large) of two
default supervised calibrations fitted on the local probe with RouteLLM's real Mixtral -> GPT-4
outcomes of GSM8K rows 200-599 (the prompt recipe on the questions, the answer recipe on
question + answer): the largest |difference| over the 200 inputs, and how many decisions at
P(large) >= 0.5 would flip.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import csv
import json
import tempfile

import numpy as np

from bench._data import STRONG_MODEL, WEAK_MODEL, add_data_argument, data_root
from evaluation.outcomes import OutcomeSet
from policies.loader import load_settings
from probes.answers import answer_input
from probes.probe import SparsityProbe
from probes.types import ProbeInput
from router.remote_probe import RemoteProbe
from tests.e2e.equivalence import default_calibration, measure_both, worst_differences
from tests.e2e.vllm_server import VllmServer, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config" / "examples" / "vllm-cascade.yaml"


def _flag(value: str) -> float:
    return 1.0 if value.strip().lower() in ("true", "1", "1.0") else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add_data_argument(parser)
    parser.add_argument("--markdown", type=Path, help="also write the report here")
    args = parser.parse_args()
    root = data_root(args.data)
    with (root / "routellm" / "mt_bench" / "question.jsonl").open(encoding="utf-8") as f:
        mt_bench = [json.loads(line)["turns"][0] for line in f if line.strip()]
    with (root / "routellm" / "gsm8k" / "gsm8k_responses.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    prompts: list[ProbeInput] = [*mt_bench[:80], *(r["prompt"] for r in rows[:120])]

    def check(r: dict[str, str]) -> ProbeInput:
        messages = [{"role": "user", "content": r["prompt"]}]
        return answer_input("chat/completions", messages, r[f"{WEAK_MODEL}_response"])

    answers = [check(r) for r in rows[:200]]
    train = rows[200:600]
    small = np.array([_flag(r[WEAK_MODEL]) for r in train])
    large = np.array([_flag(r[STRONG_MODEL]) for r in train])

    lines = [
        "# The vLLM feature probe against the local probe, on benchmark prompts",
        "",
        f"`bench/vllm_equivalence.py`: probe section of `{CONFIG.relative_to(ROOT)}` (layers 2-12 "
        "and 20-30, token means, vectors of layers 12 and 30); one vLLM CPU server with the "
        "project's plugin (float32, --enforce-eager), 16 requests at a time; the local probe in "
        "batches of 8.",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        server = VllmServer(
            "features", Path(tmp), "--enforce-eager", env={"PROBE_CONFIG": str(CONFIG)}
        )
        try:
            server.launch()
            wait_healthy([server], 600)
            settings = load_settings(CONFIG, env={"SPARSITY_ROUTER_PROBE_URL": server.url})
            section = settings.probe
            assert section.vllm is not None
            probe_settings = section.probe_settings().model_copy(update={"device": "cpu"})
            local = SparsityProbe(probe_settings)
            remote = RemoteProbe(probe_settings, section.vllm.model_copy(update={"timeout_s": 300}))
            lines += [
                "| inputs | n | mean tokens | cut at 512 | vLLM per s | last-token metrics | "
                "outlier_frac coordinates flipped | token-mean metrics | vector coordinates | "
                "score | P(large) | decisions flipped |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for name, inputs, train_inputs, train_answers in (
                ("MT-Bench + GSM8K prompts", prompts, [r["prompt"] for r in train], None),
                (
                    "GSM8K prompt + Mixtral answer",
                    answers,
                    [check(r) for r in train],
                    [r[f"{WEAK_MODEL}_response"] for r in train],
                ),
            ):
                data = OutcomeSet(
                    prompts=[r["prompt"] for r in train],
                    small=small,
                    large=large,
                    groups=["gsm8k"] * len(train),
                    answers=train_answers,
                    inputs=train_inputs,
                )
                fitted = local.measure(train_inputs, batch_size=8)
                calibration = default_calibration(local, fitted, data)
                measured = measure_both(local, remote, inputs)
                worst = worst_differences(measured)
                p_local = np.array(
                    [calibration.with_percentile(r).p_large for r in measured.local], float
                )
                p_vllm = np.array(
                    [calibration.with_percentile(r).p_large for r in measured.remote], float
                )
                flipped = int(((p_local >= 0.5) != (p_vllm >= 0.5)).sum())
                tokens = np.mean([r.n_tokens for r in measured.local])
                cut = sum(r.truncated for r in measured.local)
                row = (
                    f"| {name} | {len(inputs)} | {tokens:.0f} | {cut} | "
                    f"{len(inputs) / measured.remote_s:.1f} | {worst['metrics last']:.1e} | "
                    f"{worst['outlier_frac flips']:.0f} | "
                    f"{worst['metrics mean']:.1e} | {worst['vectors']:.1e} | "
                    f"{worst['score']:.1e} | "
                    f"{np.abs(p_local - p_vllm).max():.1e} | {flipped} |"
                )
                lines.append(row)
                print(row, flush=True)
        finally:
            server.stop()
    lines += [
        "",
        "Calibrations: the default recipes fitted with `calibrate --labels`'s code on the local "
        "probe's features of GSM8K rows 200-599 (RouteLLM's Mixtral -> GPT-4 outcomes; "
        f"{int((large > small).sum())} of 400 where GPT-4 did better). Differences are absolute; "
        "hidden-vector coordinates reach ~100 in magnitude. The last-token outlier fraction "
        "(the share of |h_i| >= mean + std) moves in steps of 1/576: it is counted apart, as "
        "coordinates that crossed the threshold between the two float implementations.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown is not None:
        args.markdown.write_text(text)
        print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
