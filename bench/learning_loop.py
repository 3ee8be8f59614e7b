"""The learning loop end to end: a gateway labels its own traffic, ``learn`` refits, and the
router gets better as labels come in.

Run: ``.venv/bin/python bench/learning_loop.py [--data DIR] [--sources routellm-mmlu ...]``

For each outcome source (the definitions of bench/transfer.py, read through
:mod:`evaluation.sources`), a seeded share of the prompts is held back (``--holdout``) and the
rest is replayed as traffic through a real gateway (this process, a loopback port, the real
bundled probe) whose ``labelling:`` section shadows every request (``sample: 1``) on the other
model and asks a judge. The small, large and judge upstreams are fakes on loopback ports that
answer from the recorded outcomes: the judge prefers the backend that was right (a tie when
both or neither were) and, with probability ``--judge-noise``, says the opposite (the same flip
for both position-swapped calls of a label). The traffic is replayed once per noise level
(request ids tell the runs apart).

Then, for each noise level and each label count in ``--labels``, the supervised calibration is
fitted on the first N labels the gateway stored (the code of ``learn`` / ``calibrate
--labels``: :mod:`evaluation.supervised`) and scored on the held-back prompts against their
*recorded* outcomes (APGR). References in the same run: the unsupervised default (the probe's
score), the same fit on the recorded labels (a noise-free judge with no ties), and the offline
figure (5-fold CV of the default recipe on the whole source, as ``sparsity-router eval``
reports it). Prints a table, writes ``--out`` (markdown) and a PNG of the curves.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    import os

    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see bench/transfer.py

import argparse
import asyncio
import json
import math
import os
import random
import re
import sqlite3
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import numpy as np

from bench._data import add_data_argument, data_root
from bench.transfer import SOURCES
from evaluation.learning import labels_outcomes
from evaluation.metrics import apgr
from evaluation.outcomes import OutcomeSet
from evaluation.routing import QualityGap, configured_scores, evaluate
from evaluation.sources import parse_source, read_sources
from evaluation.supervised import fit_label_model, label_calibration, plan_label_fit
from evaluation.tables import feature_table
from policies.loader import parse_settings
from router.app import create_app
from router.events import LabelEvent, SQLiteSink, read_events
from tests.servers import FakeUpstream, ServerThread

_ID = re.compile(r"#(\d+)\b")
_ANSWERS = re.compile(r"\[The Start of Assistant ([AB])'s Answer\]\n(.*?)\n\[The End", re.S)

CONFIG = """
probe: {{max_tokens: 512}}
backends:
  small: {{type: openai, base_urls: ["{small}"], model: small, retries: 0}}
  large: {{type: openai, base_urls: ["{large}"], model: large, retries: 0}}
  judge: {{type: openai, base_urls: ["{judge}"], model: judge, retries: 0}}
policies:
  default:
    # the probe reads every request (a score no prompt reaches: everything goes to small, and
    # the labelling shadows it on large)
    rules: [{{name: never, when: {{score: {{min: 1.5}}}}, route: large}}]
    default: small
    on_probe_error: small
events: {{sink: sqlite, path: "{events}"}}
labelling:
  enabled: true
  sample: 1.0
  small: small
  large: large
  judge: judge
  max_shadow_per_s: 1000
  queue: 10000
  store_text: true
"""


@dataclass
class Oracle:
    """The recorded outcomes of the replayed prompts, and the judge's noise."""

    small: dict[int, float]
    large: dict[int, float]
    ids: dict[str, int]  # prompt text -> row
    noise: float = 0.0
    seed: int = 0
    verdicts: dict[str, int] = field(default_factory=lambda: {"large": 0, "small": 0, "tie": 0})

    def answer(self, who: str, body: dict[str, Any]) -> str:
        row = self.ids.get(str(body["messages"][-1]["content"]), -1)
        return f"answer from {who} to #{row}"

    def judge(self, body: dict[str, Any]) -> str:
        text = str(body["messages"][-1]["content"])
        answers = dict(_ANSWERS.findall(text))
        found = _ID.search(answers.get("A", ""))
        if found is None or "B" not in answers:
            return "I cannot tell. [[C]]"
        i = int(found.group(1))
        small_pos = "A" if "from small" in answers["A"] else "B"
        large_pos = "B" if small_pos == "A" else "A"
        s, g = self.small[i], self.large[i]
        flip = random.Random(f"{self.seed}:{self.noise}:{i}").random() < self.noise
        if g > s:
            pick = small_pos if flip else large_pos
        elif s > g:
            pick = large_pos if flip else small_pos
        else:
            pick = "C"
        self.verdicts[{"C": "tie", small_pos: "small", large_pos: "large"}[pick]] += 1
        return f"Having compared both answers with care, my verdict: [[{pick}]]"


@dataclass(slots=True)
class Curve:
    noise: float
    points: dict[int, float]  # labels -> held-back APGR


async def _replay(
    url: str, prompts: Sequence[str], ids: Sequence[int], concurrency: int
) -> list[str]:
    """Send the prompts (in order, ``concurrency`` at a time); the gateway's request ids."""
    out: list[str] = [""] * len(ids)
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=120) as client:

        async def one(j: int, i: int) -> None:
            async with sem:
                r = await client.post(
                    url + "/v1/chat/completions",
                    json={"model": "auto", "messages": [{"role": "user", "content": prompts[i]}]},
                )
                r.raise_for_status()
                out[j] = r.headers["x-request-id"]

        await asyncio.gather(*(one(j, i) for j, i in enumerate(ids)))
    return out


def _labels(events: Path, request_ids: Sequence[str], timeout: float) -> list[LabelEvent]:
    """The label events of ``request_ids``, in their order, once they are all stored."""
    want = set(request_ids)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with sqlite3.connect(events) as db:
                n = db.execute("SELECT COUNT(*) FROM labels").fetchone()[0]
        except sqlite3.OperationalError:
            n = 0
        got = {}
        if n:
            sink = SQLiteSink(events)
            try:
                got = {
                    e.request_id: e
                    for e in read_events(sink)
                    if isinstance(e, LabelEvent) and e.request_id in want
                }
            finally:
                sink.close()
        if len(got) >= len(want) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    missing = len(want) - len(got)
    if missing:
        print(f"  {missing} labels missing after {timeout:.0f} s", file=sys.stderr)
    return [got[r] for r in request_ids if r in got]


def _fit_score(
    probe: Any, train: OutcomeSet, held: OutcomeSet, held_table: Any, seed: int
) -> float:
    plan = plan_label_fit(probe, len(train), answers=False)
    fitted = fit_label_model(probe, train, plan, cache=None, k=min(20, len(train) - 1), seed=seed)
    calibration = label_calibration(fitted, None, min_per_bucket=min(50, len(train)))
    _, s = configured_scores(probe, held_table, calibration)
    return apgr(s, held.small, held.large)


def run_source(
    probe: Any, name: str, data: OutcomeSet, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(data))
    n_hold = min(args.holdout, len(data) // 3)
    held_idx = np.sort(order[:n_hold])
    traffic = order[n_hold:]
    counts = [n for n in args.labels if n <= len(traffic)]
    traffic = traffic[: max(counts)]
    held = data.subset(held_idx)
    prompts = data.prompts
    held_table = feature_table(probe, [prompts[i] for i in held_idx], None, progress=False)
    _, default_s = configured_scores(probe, held_table, None)
    gap = QualityGap.of(held.small, held.large)
    result: dict[str, Any] = {
        "source": name,
        "prompts": len(data),
        "held_back": n_hold,
        "held_gap": gap.gap,
        "held_gap_status": gap.status,
        "default": apgr(default_s, held.small, held.large),
        "curves": [],
    }
    print(f"{name}: default (probe score) APGR {result['default']:.3f}", file=sys.stderr)
    # the same recipe fitted on the recorded outcomes (the best a judge can do), and the offline
    # CV figure of the default recipe on the whole source
    recorded = data.subset(traffic)
    result["recorded"] = {
        n: _fit_score(probe, recorded.subset(np.arange(n)), held, held_table, args.seed)
        for n in counts
    }
    table = feature_table(probe, data.prompts, None, progress=False)
    report = evaluate(data, table, folds=5, seed=args.seed)
    best = {r.name: r.mean("apgr") for r in report.routers}
    result["offline_cv"] = best.get("probe LR + kNN", math.nan)
    oracle = Oracle(
        {i: float(data.small[i]) for i in range(len(data))},
        {i: float(data.large[i]) for i in range(len(data))},
        {p: i for i, p in reversed(list(enumerate(data.prompts)))},
        seed=args.seed,
    )
    small = ServerThread(FakeUpstream("small", reply=lambda b: oracle.answer("small", b))).start()
    large = ServerThread(FakeUpstream("large", reply=lambda b: oracle.answer("large", b))).start()
    judge = ServerThread(FakeUpstream("judge", reply=oracle.judge)).start()
    events = workdir / f"{name}.sqlite"
    settings = parse_settings(
        CONFIG.format(small=small.url, large=large.url, judge=judge.url, events=events)
    )
    gateway = ServerThread(create_app(settings, probe=probe, labelling_seed=args.seed)).start(
        timeout=120
    )
    try:
        for noise in args.judge_noise:
            oracle.noise = noise
            t = time.monotonic()
            rids = asyncio.run(
                _replay(gateway.url, prompts, [int(i) for i in traffic], args.concurrency)
            )
            labels = _labels(events, rids, timeout=60 + 0.2 * len(rids))
            print(
                f"  noise {noise}: {len(rids)} requests, {len(labels)} labels in "
                f"{time.monotonic() - t:.0f} s; judge verdicts so far {oracle.verdicts}",
                file=sys.stderr,
                flush=True,
            )
            points = {}
            for n in counts:
                got = labels_outcomes(labels[:n]).data
                if got is None or len(got) < n * 0.9:
                    continue
                points[n] = _fit_score(probe, got, held, held_table, args.seed)
            result["curves"].append(Curve(noise, points))
            print(f"  noise {noise}: {points}", file=sys.stderr, flush=True)
    finally:
        for server in (gateway, judge, large, small):
            server.stop()
    return result


def markdown(results: Sequence[dict[str, Any]], counts: Sequence[int], command: str) -> str:
    out = [f"Command: `{command}`", ""]
    for r in results:
        out += [
            f"### {r['source']} ({r['prompts']} prompts, {r['held_back']} held back; their "
            f"quality gap {100 * r['held_gap']:.1f} points, {r['held_gap_status']})",
            "",
            "| router (APGR on the held-back prompts) | " + " | ".join(map(str, counts)) + " |",
            "|---|" + "---|" * len(counts),
        ]
        for c in r["curves"]:
            cells = [f"{c.points[n]:.3f}" if n in c.points else "" for n in counts]
            out.append(
                f"| learned from judge labels, noise {c.noise:.0%} | " + " | ".join(cells) + " |"
            )
        cells = [f"{r['recorded'][n]:.3f}" if n in r["recorded"] else "" for n in counts]
        out.append("| same fit on the recorded outcomes | " + " | ".join(cells) + " |")
        out.append(
            f"| unsupervised default (probe score) | {r['default']:.3f} |"
            + " |" * (len(counts) - 1)
        )
        out.append(
            f"| offline 5-fold CV, whole source (eval) | {r['offline_cv']:.3f} |"
            + " |" * (len(counts) - 1)
        )
        out.append("")
    return "\n".join(out)


def plot(results: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        for c in r["curves"]:
            xs = sorted(c.points)
            ax.plot(xs, [c.points[x] for x in xs], "o-", label=f"judge noise {c.noise:.0%}")
        xs = sorted(r["recorded"])
        ax.plot(xs, [r["recorded"][x] for x in xs], "k:", label="recorded outcomes")
        ax.axhline(r["default"], color="grey", ls="--", label="unsupervised default")
        ax.axhline(r["offline_cv"], color="green", ls="--", label="offline CV (whole source)")
        ax.set_xscale("log")
        ax.set_xlabel("labels collected")
        ax.set_ylabel("APGR on held-back prompts")
        ax.set_title(r["source"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_argument(parser)
    parser.add_argument("--sources", nargs="+", default=["routellm-mmlu", "routerdc-mmlu"])
    parser.add_argument("--sample", type=int, help="prompts per source (default: the source's)")
    parser.add_argument("--holdout", type=int, default=500)
    parser.add_argument(
        "--labels",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[100, 200, 500, 1000, 2000],
    )
    parser.add_argument(
        "--judge-noise", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 0.1, 0.2]
    )
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/learning_loop.md"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from probes.probe import SparsityProbe
    from probes.types import ProbeSettings

    root = data_root(args.data)
    probe = SparsityProbe(ProbeSettings())
    table = {name: (rel, mapping, sample) for name, _, rel, mapping, sample in SOURCES}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sources:
            rel, mapping, sample = table[name]
            spec = replace(
                parse_source(f"{root / rel}:{mapping},name={name}"),
                exclude=root / rel / "contaminated_prompts.jsonl"
                if name == "routellm-mmlu"
                else None,
                sample=args.sample or sample,
            )
            data = read_sources([spec], seed=args.seed)
            data = replace(data, answers=None)
            results.append(run_source(probe, name, data, args, Path(tmp)))
    counts = sorted({n for r in results for c in r["curves"] for n in c.points} | set(args.labels))
    argv = sys.argv[1:]
    if "--data" in argv:  # the data folder is the reader's own
        i = argv.index("--data")
        argv = argv[:i] + argv[i + 2 :]
    command = "python bench/learning_loop.py --data DIR " + " ".join(argv)
    text = markdown(results, counts, command)
    print(text)
    args.out.write_text("# The learning loop\n\n" + text + "\n", encoding="utf-8")
    plot(results, args.out.with_suffix(".png"))
    (args.out.with_suffix(".json")).write_text(
        json.dumps(
            [
                {**r, "curves": [{"noise": c.noise, "points": c.points} for c in r["curves"]]}
                for r in results
            ],
            indent=1,
        )
        + "\n",
        encoding="utf-8",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
