"""What a cascade's check costs per request, against the prompt router's probe pass.

Run: ``.venv/bin/python bench/cascade_cost.py [--n 100]``

Takes ``--n`` GSM8K questions with Mixtral's answers (RouteLLM's file in the benchmark data
folder: --data / $SPARSITY_ROUTER_DATA, see docs/benchmarks.md) and
times one probe pass per request (batch of one, as a lone request sees it):

- baseline: the prompt router's probe (``config/examples/supervised.yaml``: layers 10 and 20-30,
  the forward pass runs all 30 layers) on the prompt;
- the cascade's check (``config/examples/cascade.yaml``: the answer recipe, layers 2-12, the pass
  stops at layer 12) on the prompt plus the answer, and on the prompt alone for reference.

Prints tokens, median and p90 latency, and the ratios. The calibration's regression and vote add
what ``bench/supervised_cost.py`` prints.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import csv
import time

import numpy as np

from bench._data import WEAK_MODEL, add_data_argument, data_root
from policies.loader import load_settings
from probes.answers import answer_input
from probes.probe import SparsityProbe
from probes.types import ProbeInput

ROOT = Path(__file__).resolve().parents[1]


def timed(probe: SparsityProbe, items: list[ProbeInput]) -> tuple[np.ndarray, float]:
    seconds, tokens = [], []
    for item in items:
        start = time.perf_counter()
        result = probe.measure_one(item)
        seconds.append(time.perf_counter() - start)
        tokens.append(result.n_tokens)
    return np.array(seconds), float(np.mean(tokens))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100)
    add_data_argument(parser)
    args = parser.parse_args()
    path = data_root(args.data) / "routellm" / "gsm8k" / "gsm8k_responses.csv"
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[: args.n]
    prompts: list[ProbeInput] = [r["prompt"] for r in rows]
    checks = [
        answer_input(
            "chat/completions",
            [{"role": "user", "content": r["prompt"]}],
            r[f"{WEAK_MODEL}_response"],
        )
        for r in rows
    ]
    examples = ROOT / "config" / "examples"
    router = SparsityProbe(
        load_settings(examples / "supervised.yaml", env={}).probe.probe_settings()
    )
    cascade = SparsityProbe(
        load_settings(examples / "cascade.yaml", env={}).probe.probe_settings(),
        loaded=router.loaded,
    )
    for probe in (router, cascade):  # warm-up: threads, lazy kernels
        probe.measure(prompts[:4] + checks[:4])
    runs = [
        ("prompt router, prompt (baseline)", *timed(router, prompts)),
        ("cascade check, prompt + answer", *timed(cascade, checks)),
        ("cascade probe, prompt alone", *timed(cascade, prompts)),
    ]
    print(f"{len(rows)} GSM8K requests, one probe pass each")
    base = float(np.median(runs[0][1]))
    for name, s, tok in runs:
        print(
            f"  {name:34s} {tok:5.0f} tokens  p50 {np.median(s) * 1e3:6.1f} ms  "
            f"p90 {np.quantile(s, 0.9) * 1e3:6.1f} ms  {np.median(s) / base:.2f}x baseline"
        )


if __name__ == "__main__":
    main()
