"""What a cascade's check costs per request: the probe reading prompt + answer vs the prompt.

Run: ``.venv/bin/python bench/cascade_cost.py [--n 100] [--config config/examples/cascade.yaml]``

Takes ``--n`` GSM8K questions with Mixtral's answers (RouteLLM's file in ../shared/data), and
times one probe pass per request (batch of one, as a lone request sees it) with the probe of the
config (the cascade example: layers 10 and 20-30, token means, hidden vectors of 12, 18 and 30):
on the prompt alone (the baseline, in the same process) and on the prompt plus the answer (the
cascade's check). Prints tokens, median and p90 latency, and the ratio. The answer calibration's
regression and vote add what ``bench/supervised_cost.py`` prints.
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

from bench._data import WEAK_MODEL, data_root
from policies.loader import load_settings
from probes.probe import ProbeInput, SparsityProbe
from router.cascade import answer_input

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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--config", default=str(ROOT / "config/examples/cascade.yaml"))
    parser.add_argument("--data", help="the benchmark data folder (default ../shared/data)")
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
    probe = SparsityProbe(load_settings(args.config, env={}).probe.probe_settings())
    probe.measure(prompts[:4] + checks[:4])  # warm-up: threads, lazy kernels
    base, base_tokens = timed(probe, prompts)
    check, check_tokens = timed(probe, checks)
    print(f"{len(rows)} GSM8K requests, probe layers {list(probe.layers)}, one pass each")
    for name, s, tok in (
        ("prompt (baseline)", base, base_tokens),
        ("prompt + answer", check, check_tokens),
    ):
        print(
            f"  {name:18s} {tok:6.0f} tokens  p50 {np.median(s) * 1e3:6.1f} ms  "
            f"p90 {np.quantile(s, 0.9) * 1e3:6.1f} ms"
        )
    print(f"  check / prompt: {np.median(check) / np.median(base):.2f}x (median)")


if __name__ == "__main__":
    main()
