"""Write the reference prompt set the embedded default calibration is fitted on.

A mix of everyday assistant traffic from the benchmark data folder (--data /
$SPARSITY_ROUTER_DATA, see docs/benchmarks.md): the 80 MT-Bench first turns (writing,
roleplay, reasoning, math, coding, extraction, STEM, humanities), and seeded samples of GSM8K
word problems and MMLU questions. Prompts only; the calibration stores score quantiles, never
the prompts.

    .venv/bin/python bench/reference_prompts.py --data DIR --out /tmp/reference.jsonl
    .venv/bin/sparsity-router calibrate --reference /tmp/reference.jsonl \
        --out config/calibration/default.json --plot bench/results/default_calibration.png
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _data import add_data_argument, data_root, read_gsm8k, read_mmlu


def build(root: Path, n_gsm8k: int, n_mmlu: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    prompts = []
    with (root / "routellm" / "mt_bench" / "question.jsonl").open(encoding="utf-8") as f:
        prompts += [json.loads(line)["turns"][0] for line in f if line.strip()]
    gsm8k = [o.prompt for o in read_gsm8k(root)]
    mmlu = [o.prompt for o in read_mmlu(root)]
    prompts += rng.sample(gsm8k, min(n_gsm8k, len(gsm8k)))
    prompts += rng.sample(mmlu, min(n_mmlu, len(mmlu)))
    return prompts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    add_data_argument(parser)
    parser.add_argument("--gsm8k", type=int, default=400)
    parser.add_argument("--mmlu", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    prompts = build(data_root(args.data), args.gsm8k, args.mmlu, args.seed)
    with args.out.open("w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}, ensure_ascii=False) + "\n")
    print(f"wrote {len(prompts)} reference prompts to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
