"""How fast is the probe? Latency, throughput and roofline against a naive baseline.

Run::

    .venv/bin/python bench/probe_speed.py [--layer L ...] [--prefix-cache] [--threads T]
        [--repeats N] [--json out] [--options] [--compile] [--check-signal] [--signal-bf16]

Everything runs in one process on one loaded model, so the ratios are fair:

- **latency** p50/p95 at 32, 128 and 512 tokens, batch 1: the probe as configured
  (``SparsityProbe.hidden_states``: early exit at the deepest requested layer, no LM head; then
  the metrics at the last token) next to the naive baseline, the full CausalLM forward with
  ``output_hidden_states=True`` on the same ids. Probe and baseline calls alternate, so drift
  from other load on the machine hits both alike.
- **throughput** at batch 16 of 128-token prompts (prompts/s, tokens/s), and ``measure()`` on
  mixed-length real prompts at batch size 1 and 16 (what padding costs).
- **roofline**: 2 x non-embedding parameters of the layers that run x tokens / peak fp32 matmul
  FLOP/s (a 2048^3 matmul timed in the same run).
- **per depth**: probe latency at 128 tokens reading layer 4, 8, 12, 16, 20, 30.
- ``--options``: speed options at 128 tokens (prefix cache, attention implementation, threads,
  bf16, int8 dynamic quantization of nn.Linear, optionally torch.compile) next to the probe as
  configured, with the largest change they make to top1_energy on that input.
- ``--check-signal``: for the options that change numbers (int8; bf16 with ``--signal-bf16``),
  Pearson/Spearman of per-prompt top1_energy and effective_rank against fp32 over ~200 varied
  prompts (GSM8K questions, word-shuffled GSM8K questions, MMLU questions), and, per layer, the
  AUROC of clean vs word-shuffled GSM8K: whether the distribution-shift signal survives.

Inputs are real text: GSM8K questions rendered with the probe's chat template, tokenized and
concatenated; each sample is a window of exactly the stated length starting at a prompt's start
(so, like a real request, it opens with the chat template's system prompt). The text comes from
RouteLLM's GSM8K and MMLU files in the benchmark data folder (--data / $SPARSITY_ROUTER_DATA, see
docs/benchmarks.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # `python bench/probe_speed.py` puts bench/ first on sys.path, where bench/signal.py would
    # shadow the standard library's `signal` module (imported by torch): use the repo root.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import copy
import csv
import functools
import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from bench._data import add_data_argument, data_root
from probes.metrics import compute_all
from probes.model import LoadedModel, load_model
from probes.probe import SparsityProbe
from probes.types import ProbeResult, ProbeSettings

LENGTHS = (32, 128, 512)
DEPTHS = (4, 8, 12, 16, 20, 30)
THROUGHPUT_BATCH = 16
THROUGHPUT_TOKENS = 128
MIXED_PROMPTS = 32
TARGET_RATIO = 0.35

# Used only when the GSM8K file is missing: real English prose, never random ids.
_FALLBACK_TEXT = [
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes "
    "muffins for her friends every day with four. She sells the remainder at the farmers' market "
    "daily for $2 per fresh duck egg. How much in dollars does she make every day?",
    "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total "
    "does it take?",
    "Josh decides to try flipping a house. He buys a house for $80,000 and then puts in $50,000 "
    "in repairs. This increased the value of the house by 150%. How much profit did he make?",
    "James decides to run 3 sprints 3 times a week. He runs 60 meters each sprint. How many total "
    "meters does he run a week?",
]


# -- inputs ------------------------------------------------------------------------------------
def gsm8k_questions(data: Path) -> list[str]:
    path = data / "gsm8k" / "gsm8k_responses.csv"
    if not path.is_file():
        return list(_FALLBACK_TEXT)
    with path.open(newline="", encoding="utf-8") as handle:
        return [row["prompt"] for row in csv.DictReader(handle) if row.get("prompt")]


def mmlu_questions(data: Path, n: int, rng: random.Random) -> list[str]:
    files = sorted((data / "mmlu").glob("mmlu_*.csv"))
    if not files:
        return []
    out: list[str] = []
    for path in rng.sample(files, min(n, len(files))):
        with path.open(newline="", encoding="utf-8") as handle:
            rows = [row["prompt"] for row in csv.DictReader(handle) if row.get("prompt")]
        if rows:
            out.append(rng.choice(rows))
    return out


@dataclass(frozen=True, slots=True)
class TokenPool:
    """Token ids of many chat-templated prompts, concatenated; windows start at prompt starts."""

    ids: list[int]
    starts: list[int]

    @classmethod
    def build(cls, probe: SparsityProbe, texts: Sequence[str]) -> TokenPool:
        ids: list[int] = []
        starts: list[int] = []
        for text in texts:
            starts.append(len(ids))
            ids.extend(probe.encode(text)[0])
            if len(ids) >= 2 * max(LENGTHS) and len(starts) > THROUGHPUT_BATCH:
                break
        return cls(ids, starts)

    def window(self, n: int, k: int = 0) -> list[int]:
        """The k-th window of exactly ``n`` real tokens."""
        usable = [s for s in self.starts if s + n <= len(self.ids)]
        if not usable:
            raise SystemExit(f"not enough text for a {n}-token window")
        start = usable[k % len(usable)]
        return self.ids[start : start + n]


# -- timing ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Timing:
    p50_ms: float
    p95_ms: float
    n: int

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> Timing:
        arr = np.asarray(samples_ms, dtype=np.float64)
        return cls(float(np.percentile(arr, 50)), float(np.percentile(arr, 95)), len(arr))


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int = 3,
    caps: Mapping[str, int] | None = None,
) -> dict[str, Timing]:
    """Round-robin timing: rep i runs every function once, so slow drift hits all alike."""
    caps = caps or {}
    for name, fn in fns.items():
        for _ in range(min(warmup, caps.get(name, warmup))):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(repeats):
        for name, fn in fns.items():
            if rep >= caps.get(name, repeats):
                continue
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: Timing.of(s) for name, s in samples.items()}


def matmul_flops(size: int = 2048, repeats: int = 10) -> float:
    """Peak fp32 matmul FLOP/s with the current thread settings (best of ``repeats``).

    The best, not the median: the roofline is what the machine can do, and other load on a
    shared machine only ever makes a call slower.
    """
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen)
    b = torch.randn(size, size, generator=gen)
    for _ in range(3):
        torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


# -- model variants ----------------------------------------------------------------------------
def decoder_layers(model: Any) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM (``model`` is untyped, like transformers)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise SystemExit(f"{type(model).__name__}: cannot find decoder layers")
    return layers


def non_embedding_params(model: Any, depth: int) -> int:
    """Parameters of the first ``depth`` decoder layers (the work an early-exit probe does)."""
    return sum(p.numel() for layer in decoder_layers(model)[:depth] for p in layer.parameters())


def with_model(lm: LoadedModel, model: Any, dtype: torch.dtype) -> LoadedModel:
    return LoadedModel(lm.spec, lm.source, model, lm.tokenizer, lm.device, dtype)


@contextmanager
def quiet_quantization_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated (but still the only fast int8 CPU path in 2.13).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


def int8_model(model: Any, *, keep_down_proj: bool) -> Any:
    """A copy with the decoder layers' nn.Linear dynamically quantized to int8 (fbgemm/x86).

    ``keep_down_proj`` leaves the MLP down projections in fp32: their inputs carry the massive
    activations of the attention-sink token (|x| up to ~3000 vs ~1 elsewhere), which a per-tensor
    activation scale turns into zeros for every other token. Other linears use per-channel weights.
    """
    from torch.ao.quantization import (
        default_dynamic_qconfig,
        per_channel_dynamic_qconfig,
        quantize_dynamic,
    )

    out = copy.deepcopy(model)
    qconfig = per_channel_dynamic_qconfig if keep_down_proj else default_dynamic_qconfig
    with quiet_quantization_warnings():
        for layer in decoder_layers(out):
            spec = {
                name: qconfig
                for name, mod in layer.named_modules()
                if isinstance(mod, nn.Linear)
                and not (keep_down_proj and name.endswith("down_proj"))
            }
            quantize_dynamic(layer, spec, dtype=torch.qint8, inplace=True)  # type: ignore[no-untyped-call]
    return out


def eager_model(model: Any) -> Any:
    out = copy.deepcopy(model)
    out.set_attn_implementation("eager")
    return out


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    build: Callable[[], tuple[Any, torch.dtype]]
    settings: Mapping[str, Any] = field(default_factory=dict)  # ProbeSettings updates
    threads: int | None = None
    changes_numbers: bool = False
    max_repeats: int | None = None


def make_variants(lm: LoadedModel, settings: ProbeSettings) -> list[Variant]:
    threads = torch.get_num_threads()
    same = lambda: (lm.model, lm.dtype)  # noqa: E731
    configured = (
        f"as configured: {str(lm.dtype).removeprefix('torch.')}, "
        f"{lm.model.config._attn_implementation}, {threads} threads"
        + (", prefix cache" if settings.prefix_cache else "")
    )
    toggle = not settings.prefix_cache
    variants = [
        Variant(configured, same),
        Variant(f"prefix cache {'on' if toggle else 'off'}", same, {"prefix_cache": toggle}),
        Variant("eager attention", lambda: (eager_model(lm.model), lm.dtype)),
    ]
    if threads > 1:
        variants.append(Variant("1 thread", same, threads=1))
    variants += [
        Variant(
            "bf16 weights+activations",
            lambda: (copy.deepcopy(lm.model).to(torch.bfloat16), torch.bfloat16),
            changes_numbers=True,
            max_repeats=4,
        ),
        Variant(
            "int8 dynamic, all linears (per-tensor)",
            lambda: (int8_model(lm.model, keep_down_proj=False), lm.dtype),
            changes_numbers=True,
        ),
        Variant(
            "int8 dynamic, down_proj fp32 (per-channel)",
            lambda: (int8_model(lm.model, keep_down_proj=True), lm.dtype),
            changes_numbers=True,
        ),
    ]
    return variants


# -- probe / baseline callables ----------------------------------------------------------------
def probe_call(
    probe: SparsityProbe, batch: list[list[int]]
) -> Callable[[], dict[int, dict[str, torch.Tensor]]]:
    """What ``measure`` does after tokenization: the early-exit forward, then the metrics."""
    names = probe.settings.metrics

    def run() -> dict[int, dict[str, torch.Tensor]]:
        states, _ = probe.hidden_states(batch)
        return {layer: compute_all(h[:, -1, :], names) for layer, h in states.items()}

    return run


def naive_call(lm: LoadedModel, batch: list[list[int]]) -> Callable[[], object]:
    input_ids = torch.tensor(batch, dtype=torch.long, device=lm.device)
    mask = torch.ones_like(input_ids)

    def run() -> object:
        with torch.inference_mode():
            return lm.model(
                input_ids=input_ids,
                attention_mask=mask,
                output_hidden_states=True,
                use_cache=False,
            )

    return run


@contextmanager
def threads_set(n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- statistics --------------------------------------------------------------------------------
def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):  # average ties
        tied = x == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return pearson(_ranks(a), _ranks(b))


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties count half (Mann-Whitney)."""
    ranks = _ranks(np.concatenate([pos, neg]))
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


# -- signal check ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SignalSet:
    texts: list[str]
    kinds: list[str]  # "gsm8k" | "shuffled" | "mmlu"


def signal_prompts(data: Path, n: int, seed: int) -> SignalSet:
    """Half GSM8K questions, a quarter word-shuffled GSM8K questions, a quarter MMLU questions."""
    rng = random.Random(seed)
    questions = gsm8k_questions(data)
    n_mmlu = n // 4
    n_shuf = n // 4
    n_clean = n - n_mmlu - n_shuf
    picked = rng.sample(questions, min(len(questions), n_clean + n_shuf))
    clean = picked[:n_clean]
    shuffled = []
    for text in picked[n_clean:]:
        words = text.split()
        rng.shuffle(words)
        shuffled.append(" ".join(words))
    mmlu = mmlu_questions(data, n_mmlu, rng)
    texts = clean + shuffled + mmlu
    kinds = ["gsm8k"] * len(clean) + ["shuffled"] * len(shuffled) + ["mmlu"] * len(mmlu)
    return SignalSet(texts, kinds)


SIGNAL_METRICS = ("top1_energy", "effective_rank")
POSITIONS = ("last", "mean")


def _values(results: Sequence[ProbeResult], layer: int, metric: str, pos: str) -> np.ndarray:
    return np.array([r.value(layer, metric, "last" if pos == "last" else "mean") for r in results])


@dataclass(slots=True)
class SignalReport:
    variant: str
    seconds: float
    # "L12/top1_energy/last" -> {"pearson": .., "spearman": ..}
    vs_reference: dict[str, dict[str, float]] = field(default_factory=dict)
    # "L12/top1_energy/last" -> AUROC, word-shuffled vs clean GSM8K, oriented higher = sparser
    shift_auroc: dict[str, float] = field(default_factory=dict)


def check_signal(
    lm: LoadedModel,
    base: ProbeSettings,
    variants: Sequence[Variant],
    corr_layers: Sequence[int],
    prompts: SignalSet,
    batch_size: int,
) -> list[SignalReport]:
    n = lm.n_layers
    settings = base.model_copy(
        update={"layers": tuple(range(n + 1)), "score_layer": n, "token_mean": True}
    )
    reports: list[SignalReport] = []
    reference: list[ProbeResult] | None = None
    kinds = np.array(prompts.kinds)
    for variant in variants:
        model, dtype = variant.build()
        probe = SparsityProbe(
            settings.model_copy(update=dict(variant.settings)), loaded=with_model(lm, model, dtype)
        )
        t0 = time.perf_counter()
        with quiet_quantization_warnings(), threads_set(variant.threads):
            results = probe.measure(prompts.texts, batch_size=batch_size)
        report = SignalReport(variant.name, time.perf_counter() - t0)
        if reference is None:
            reference = results
        for layer in range(n + 1):
            for metric in SIGNAL_METRICS:
                sign = 1.0 if metric == "top1_energy" else -1.0  # oriented: higher = sparser
                for pos in POSITIONS:
                    key = f"L{layer}/{metric}/{pos}"
                    b = _values(results, layer, metric, pos)
                    report.shift_auroc[key] = auroc(
                        sign * b[kinds == "shuffled"], sign * b[kinds == "gsm8k"]
                    )
                    if variant.changes_numbers and layer in corr_layers:
                        a = _values(reference, layer, metric, pos)
                        report.vs_reference[key] = {
                            "pearson": pearson(a, b),
                            "spearman": spearman(a, b),
                        }
        reports.append(report)
        print(f"  signal: {variant.name} done in {report.seconds:.0f} s", file=sys.stderr)
    return reports


# -- measurements ------------------------------------------------------------------------------
def run_options(
    lm: LoadedModel,
    settings: ProbeSettings,
    variants: Sequence[Variant],
    batch: list[list[int]],
    repeats: int,
    try_compile: bool,
) -> dict[str, Any]:
    fns: dict[str, Callable[[], dict[int, dict[str, torch.Tensor]]]] = {}
    caps: dict[str, int] = {}
    numbers: dict[str, bool] = {}
    extra: dict[str, dict[str, Any]] = {}
    for v in variants:
        model, dtype = v.build()
        probe = SparsityProbe(
            settings.model_copy(update=dict(v.settings)), loaded=with_model(lm, model, dtype)
        )
        call = probe_call(probe, batch)
        fns[v.name] = call if v.threads is None else _typed_threads(v.threads, call)
        numbers[v.name] = v.changes_numbers
        if v.max_repeats is not None:
            caps[v.name] = v.max_repeats
    if try_compile:
        name = "torch.compile per decoder layer"
        compiled = copy.deepcopy(lm.model)
        for layer in decoder_layers(compiled):
            layer.compile(dynamic=False)
        probe = SparsityProbe(settings, loaded=with_model(lm, compiled, lm.dtype))
        fn = probe_call(probe, batch)
        t0 = time.perf_counter()
        fn()
        extra[name] = {"compile_s": time.perf_counter() - t0}
        fns[name] = fn
        numbers[name] = False
    with quiet_quantization_warnings():
        outputs = {name: fn() for name, fn in fns.items()}
        timings = time_interleaved(fns, repeats, caps=caps)
    ref_name = next(iter(timings))
    ref = timings[ref_name]
    rows: list[dict[str, Any]] = []
    for name, t in timings.items():
        delta = max(
            float((outputs[name][layer]["top1_energy"] - values["top1_energy"]).abs().max())
            for layer, values in outputs[ref_name].items()
        )
        rows.append(
            {
                "name": name,
                **asdict(t),
                "speedup": ref.p50_ms / t.p50_ms,
                "changes_numbers": numbers[name],
                "max_abs_delta_top1_energy": delta,
                **extra.get(name, {}),
            }
        )
    return {"layers": list(settings.layers), "rows": rows}


def _typed_threads(
    n: int, fn: Callable[[], dict[int, dict[str, torch.Tensor]]]
) -> Callable[[], dict[int, dict[str, torch.Tensor]]]:
    def run() -> dict[int, dict[str, torch.Tensor]]:
        with threads_set(n):
            return fn()

    return run


def run_mixed(probe: SparsityProbe, texts: Sequence[str], repeats: int) -> dict[str, Any]:
    """``measure()`` on real prompts of mixed length: batch size 1 (no padding) vs 16."""
    lengths = sorted(len(probe.encode(t)[0]) for t in texts)
    fns: dict[str, Callable[[], object]] = {
        f"batch_size {b}": functools.partial(probe.measure, texts, batch_size=b) for b in (1, 16)
    }
    timings = time_interleaved(fns, repeats, warmup=1)
    rows = []
    for b, (name, t) in zip((1, 16), timings.items(), strict=True):
        padded = sum(
            max(lengths[i : i + b]) * len(lengths[i : i + b]) for i in range(0, len(lengths), b)
        )
        rows.append(
            {
                "name": name,
                **asdict(t),
                "prompts_per_s": len(texts) / (t.p50_ms / 1e3),
                "tokens_per_s": sum(lengths) / (t.p50_ms / 1e3),
                "padding_share": 1 - sum(lengths) / padded,
            }
        )
    return {
        "n_prompts": len(texts),
        "median_tokens": float(np.median(lengths)),
        "rows": rows,
    }


# -- printing ----------------------------------------------------------------------------------
def _ms(t: Mapping[str, Any]) -> str:
    return f"{t['p50_ms']:8.1f} {t['p95_ms']:8.1f}"


def print_report(out: Mapping[str, Any]) -> None:
    env = out["env"]
    print(
        f"probe_speed  model={env['model']}  device={env['device']} ({env['cpu_capability']})  "
        f"dtype={env['dtype']}  threads={env['threads']}  torch={env['torch']}"
    )
    print(
        f"probe: layers {env['probe_layers']} (runs {env['probe_depth']}/{env['n_layers']} decoder "
        f"layers), prefix cache {'on' if env['prefix_cache'] else 'off'}  repeats={env['repeats']}"
        f"  loadavg before/after={env['loadavg_before']}/{env['loadavg_after']}"
    )
    print()
    print("latency, batch 1 (ms)     probe p50      p95    naive p50      p95   probe/naive")
    for row in out["latency"]:
        ok = "ok" if row["ratio_p50"] <= TARGET_RATIO else "--"
        print(
            f"  {row['tokens']:4d} tokens          {_ms(row['probe'])}     {_ms(row['naive'])}"
            f"     {row['ratio_p50']:.3f} {ok}"
        )
    print(f"  (target at 128 tokens: probe/naive <= {TARGET_RATIO})")
    print()
    tp = out["throughput"]
    print(f"throughput, batch {tp['batch']} x {tp['tokens']} tokens")
    for name in ("probe", "naive"):
        row = tp[name]
        print(
            f"  {name:5s}  {row['p50_ms']:8.1f} ms/batch  {row['prompts_per_s']:7.1f} prompts/s  "
            f"{row['tokens_per_s']:8.0f} tokens/s"
        )
    print(f"  probe/naive time ratio {tp['ratio']:.3f}")
    mx = out["mixed"]
    print(
        f"  measure() on {mx['n_prompts']} mixed-length GSM8K prompts (median "
        f"{mx['median_tokens']:.0f} tokens, length-sorted batches):"
    )
    for row in mx["rows"]:
        print(
            f"    {row['name']:14s} {row['prompts_per_s']:7.1f} prompts/s  "
            f"{row['tokens_per_s']:8.0f} tokens/s  padding {100 * row['padding_share']:4.1f}%"
        )
    print()
    rf = out["roofline"]
    print(
        f"roofline  (peak fp32 matmul {rf['matmul_gflops']:.0f} GFLOP/s measured; "
        "2 x non-embedding params x tokens; the LM head of the naive run, "
        f"{rf['lm_head_gflop_128']:.1f} GFLOP at 128 tokens, not counted)"
    )
    print(
        f"  {'tokens':>6s}  full model: {rf['full_depth']} layers, {rf['full_params_m']:.1f} M   "
        f"probe: {rf['probe_depth']} layers, {rf['probe_params_m']:.1f} M"
    )
    for row in rf["rows"]:
        print(f"  {row['tokens']:6d}  {row['full_ms']:10.1f} ms {'':21s}{row['probe_ms']:10.1f} ms")
    print()
    pd = out["per_depth"]
    print(
        f"per depth, 128 tokens, batch 1, probe settings otherwise as configured "
        f"(naive p50 {pd['naive']['p50_ms']:.1f} ms in this pass)"
    )
    print("  layer        " + "".join(f"{row['layer']:>9d}" for row in pd["rows"]))
    print("  p50 ms       " + "".join(f"{row['p50_ms']:9.1f}" for row in pd["rows"]))
    print("  p95 ms       " + "".join(f"{row['p95_ms']:9.1f}" for row in pd["rows"]))
    print("  /naive       " + "".join(f"{row['ratio_p50']:9.3f}" for row in pd["rows"]))
    print("  roofline ms  " + "".join(f"{row['roofline_ms']:9.1f}" for row in pd["rows"]))
    if "options" in out:
        opt = out["options"]
        print()
        print(
            f"options, probe layers {opt['layers']}, 128 tokens, batch 1"
            f"{'':9s}p50 ms   p95 ms  speedup  max|d top1_energy|"
        )
        for row in opt["rows"]:
            extra = f"  (compile {row['compile_s']:.0f} s)" if "compile_s" in row else ""
            print(
                f"  {row['name']:56s} {row['p50_ms']:8.1f} {row['p95_ms']:8.1f} "
                f"{row['speedup']:7.2f}x  {row['max_abs_delta_top1_energy']:.1e}{extra}"
            )
    if "signal" in out:
        print_signal(out["signal"])


def print_signal(sig: Mapping[str, Any]) -> None:
    print()
    print(
        f"signal check: {sig['n_prompts']} prompts ({sig['mix']}); Pearson/Spearman vs "
        f"{sig['reports'][0]['variant']}, per prompt, last token | token mean"
    )
    for rep in sig["reports"]:
        if not rep["vs_reference"]:
            continue
        print(f"  {rep['variant']}")
        for layer in sig["corr_layers"]:
            cells = []
            for metric in SIGNAL_METRICS:
                for pos in POSITIONS:
                    c = rep["vs_reference"][f"L{layer}/{metric}/{pos}"]
                    cells.append(f"{c['pearson']:6.3f}/{c['spearman']:6.3f}")
            print(
                f"    L{layer:<3d} top1_energy {cells[0]} | {cells[1]}   "
                f"effective_rank {cells[2]} | {cells[3]}"
            )
    print(
        "shift AUROC per layer, word-shuffled vs clean GSM8K, oriented higher = sparser "
        "(0.5 = no signal; < 0.5 = signal of the opposite sign)"
    )
    n = sig["n_layers"]
    print("  layer" + " " * 35 + "".join(f"{layer:>5d}" for layer in range(n + 1)))
    for rep in sig["reports"]:
        for metric in SIGNAL_METRICS:
            for pos in POSITIONS:
                label = f"  {rep['variant'][:22]:22s} {metric[:9]:9s} {pos:4s}"
                values = "".join(
                    f"{rep['shift_auroc'][f'L{layer}/{metric}/{pos}']:5.2f}"
                    for layer in range(n + 1)
                )
                print(label + values)


# -- main --------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--layer",
        type=int,
        action="append",
        help="probe layer (repeatable; default: the ProbeSettings default)",
    )
    p.add_argument("--prefix-cache", action="store_true", help="ProbeSettings.prefix_cache")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--model", default=None, help="probe model spec (default: ProbeSettings)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per measurement")
    p.add_argument(
        "--depths",
        type=lambda v: tuple(int(x) for x in v.split(",")),
        default=DEPTHS,
        help=f"layers for the per-depth line (default: {','.join(map(str, DEPTHS))})",
    )
    p.add_argument("--json", type=Path, default=None, help="also write all figures here")
    add_data_argument(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--options", action="store_true", help="time speed options at 128 tokens")
    p.add_argument("--compile", action="store_true", help="with --options: try torch.compile")
    p.add_argument("--check-signal", action="store_true", help="correlate int8 with fp32")
    p.add_argument("--signal-bf16", action="store_true", help="also check bf16 (slow on CPU)")
    p.add_argument("--signal-prompts", type=int, default=200)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    loadavg_before = os.getloadavg()[0]

    update: dict[str, Any] = {"prefix_cache": args.prefix_cache}
    if args.layer:
        update.update(layers=tuple(args.layer), score_layer=args.layer[0])
    if args.model:
        update["model"] = args.model
    if args.threads:
        update["threads"] = args.threads
    settings = ProbeSettings(**update)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    lm = load_model(settings.model, device=settings.device, dtype=settings.dtype)
    probe = SparsityProbe(settings, loaded=lm)
    n_layers = probe.n_layers
    depth = min(probe.deepest_layer, n_layers)
    repeats = args.repeats
    routellm = data_root(args.data) / "routellm"
    questions = gsm8k_questions(routellm)
    pool = TokenPool.build(probe, questions)

    out: dict[str, Any] = {
        "env": {
            "model": settings.model,
            "device": str(lm.device),
            "dtype": str(lm.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "probe_layers": list(probe.layers),
            "probe_depth": depth,
            "n_layers": n_layers,
            "prefix_cache": settings.prefix_cache,
            "repeats": repeats,
            "seed": args.seed,
        }
    }

    # 1. latency, batch 1
    out["latency"] = []
    for n in LENGTHS:
        batch = [pool.window(n)]
        t = time_interleaved(
            {"probe": probe_call(probe, batch), "naive": naive_call(lm, batch)}, repeats
        )
        out["latency"].append(
            {
                "tokens": n,
                "probe": asdict(t["probe"]),
                "naive": asdict(t["naive"]),
                "ratio_p50": t["probe"].p50_ms / t["naive"].p50_ms,
            }
        )
        print(f"  latency {n}: done", file=sys.stderr)

    # 2. throughput: batch 16 x 128 tokens; measure() on mixed lengths
    batch16 = [pool.window(THROUGHPUT_TOKENS, k) for k in range(THROUGHPUT_BATCH)]
    tps = time_interleaved(
        {"probe": probe_call(probe, batch16), "naive": naive_call(lm, batch16)},
        max(3, repeats // 4),
        warmup=1,
    )
    out["throughput"] = {
        "batch": THROUGHPUT_BATCH,
        "tokens": THROUGHPUT_TOKENS,
        "ratio": tps["probe"].p50_ms / tps["naive"].p50_ms,
        **{
            name: {
                **asdict(t),
                "prompts_per_s": THROUGHPUT_BATCH / (t.p50_ms / 1e3),
                "tokens_per_s": THROUGHPUT_BATCH * THROUGHPUT_TOKENS / (t.p50_ms / 1e3),
            }
            for name, t in tps.items()
        },
    }
    mixed = random.Random(args.seed).sample(questions, min(MIXED_PROMPTS, len(questions)))
    out["mixed"] = run_mixed(probe, mixed, max(2, repeats // 8))
    print("  throughput: done", file=sys.stderr)

    # 3. roofline
    flops = matmul_flops()
    full_params = non_embedding_params(lm.model, n_layers)
    probe_params = non_embedding_params(lm.model, depth)
    vocab, width = lm.model.get_input_embeddings().weight.shape
    out["roofline"] = {
        "matmul_gflops": flops / 1e9,
        "full_depth": n_layers,
        "probe_depth": depth,
        "full_params_m": full_params / 1e6,
        "probe_params_m": probe_params / 1e6,
        "lm_head_gflop_128": 2 * vocab * width * 128 / 1e9,
        "rows": [
            {
                "tokens": n,
                "full_ms": 2 * full_params * n / flops * 1e3,
                "probe_ms": 2 * probe_params * n / flops * 1e3,
            }
            for n in LENGTHS
        ],
    }

    # 4. per depth at 128 tokens
    batch128 = [pool.window(128)]
    depth_fns: dict[str, Callable[[], object]] = {"naive": naive_call(lm, batch128)}
    for d in args.depths:
        if 0 < d <= n_layers:
            p = SparsityProbe(
                settings.model_copy(update={"layers": (d,), "score_layer": d}), loaded=lm
            )
            depth_fns[str(d)] = probe_call(p, batch128)
    td = time_interleaved(depth_fns, repeats)
    naive128 = td.pop("naive")
    out["per_depth"] = {
        "naive": asdict(naive128),
        "rows": [
            {
                "layer": int(d),
                **asdict(t),
                "ratio_p50": t.p50_ms / naive128.p50_ms,
                "roofline_ms": 2 * non_embedding_params(lm.model, int(d)) * 128 / flops * 1e3,
            }
            for d, t in td.items()
        ],
    }
    print("  per depth: done", file=sys.stderr)

    # 5. speed options
    variants = make_variants(lm, settings)
    if args.options:
        out["options"] = run_options(lm, settings, variants, batch128, repeats, args.compile)
        print("  options: done", file=sys.stderr)

    # 6. signal
    if args.check_signal:
        prompts = signal_prompts(routellm, args.signal_prompts, args.seed)
        chosen = [variants[0], *(v for v in variants if v.changes_numbers and "int8" in v.name)]
        if args.signal_bf16:
            chosen += [v for v in variants if v.name.startswith("bf16")]
        corr_layers = sorted({*args.depths, *probe.layers} & set(range(n_layers + 1)))
        reports = check_signal(lm, settings, chosen, corr_layers, prompts, batch_size=8)
        counts = {k: prompts.kinds.count(k) for k in dict.fromkeys(prompts.kinds)}
        out["signal"] = {
            "n_prompts": len(prompts.texts),
            "mix": ", ".join(f"{v} {k}" for k, v in counts.items()),
            "n_layers": n_layers,
            "corr_layers": corr_layers,
            "reports": [asdict(r) for r in reports],
        }

    out["env"]["loadavg_before"] = round(loadavg_before, 2)
    out["env"]["loadavg_after"] = round(os.getloadavg()[0], 2)
    print_report(out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
