"""Beyond sparsity metrics: does the probe's own representation route better?

Run: ``.venv/bin/python bench/routing_states.py [--data DIR] [--mmlu-n 2000]``

In the same forward pass that fills the ``sparsity-router eval`` feature cache (every layer, both
positions, perplexity), this also keeps, per prompt, the probe's hidden vectors (token mean and
last token) at a few layers (in that cache: ``extract(state_layers=...)``, what
``sparsity-router calibrate --labels`` reads too) and the statistics of its next-token
distribution at the last prompt token (entropy, top-1 probability, the log-probabilities of the
answer letters A-D; cached in ``<cache>/states/``). Then it scores, with the same stratified
5-fold CV as ``eval`` (L2 by inner CV on the training folds), routers on:

- the shipped sparsity recipe (layers 20-30 x 5 metrics x both positions + log length);
- the probe's hidden vectors (a linear "probe embedding" router), alone and with the recipe;
- the next-token statistics, alone and with the recipe;
- nearest-neighbour label smoothing in the probe's state space (RouteLLM's similarity-weighted
  idea), alone and stacked with the recipe;

next to the baselines of the same folds (length, perplexity, MiniLM LR). One markdown table.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import hashlib
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bench._data import add_data_argument, data_root
from bench.routing_eval import METRICS5, parse
from evaluation.baselines import embed_minilm
from evaluation.crossval import fold_ids
from evaluation.metrics import apgr
from evaluation.outcomes import OutcomeSet, read_outcomes

FloatArray = NDArray[np.float64]
STATE_LAYERS = (6, 12, 18, 24, 30)
LETTERS = ("A", "B", "C", "D", " A", " B", " C", " D")


def _key(ids: Sequence[int]) -> str:
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()[:24]


class NextTokenRecorder:
    """Wraps ``probe.hidden_states`` to keep next-token statistics per prompt."""

    def __init__(self, probe: Any) -> None:
        import torch

        self.rows: dict[str, NDArray[np.float32]] = {}
        tok = probe.loaded.tokenizer
        self.letter_ids = [tok.encode(s, add_special_tokens=False)[-1] for s in LETTERS]
        lm_head = probe.loaded.model.get_output_embeddings()
        inner = probe.hidden_states

        def hidden_states(batch: Sequence[list[int]]) -> Any:
            states, mask = inner(batch)
            with torch.inference_mode():
                logp = torch.log_softmax(lm_head(states[probe.n_layers][:, -1, :]).float(), -1)
            ent = -(logp.exp() * logp).sum(-1, keepdim=True)
            top = logp.max(-1, keepdim=True).values
            letters = logp[:, self.letter_ids]
            vec = torch.cat([ent, top, letters], -1).float().cpu().numpy()
            for ids, row in zip(batch, vec, strict=True):
                self.rows[_key(ids)] = row
            return states, mask

        probe.hidden_states = hidden_states


def probe_everything(probe: Any, prompts: list[str], folder: Path) -> tuple[Any, FloatArray]:
    """The eval feature table (with the hidden vectors at STATE_LAYERS, in the product's feature
    cache) and the state rows of ``prompts``: per layer [mean | last], then next-token stats."""
    from evaluation.tables import all_layer_probe
    from probes.feature_names import state_block
    from probes.features import default_cache_dir, extract

    full = all_layer_probe(probe)
    keys = [_key(full.encode(p, i)[0]) for i, p in enumerate(prompts)]
    folder.mkdir(parents=True, exist_ok=True)
    store = folder / "next_token.npz"
    have: dict[str, NDArray[np.float32]] = {}
    if store.exists():
        with np.load(store) as z:
            have = dict(zip(z["keys"].tolist(), z["rows"], strict=True))
    recorder = NextTokenRecorder(full)
    table = extract(
        full, prompts, cache_dir=default_cache_dir(), progress=True, state_layers=STATE_LAYERS
    )
    have.update(recorder.rows)
    missing = [i for i, k in enumerate(keys) if k not in have]
    if missing:  # features were cached, next-token stats not: a private cache forces the pass
        extract(full, [prompts[i] for i in missing], cache_dir=folder / "features", progress=True)
        have.update(recorder.rows)
    if recorder.rows:
        np.savez(store, keys=np.array(list(have)), rows=np.stack(list(have.values())))
    blocks = [table.states[state_block(la, p)] for la in STATE_LAYERS for p in ("mean", "last")]
    nxt = np.stack([have[k] for k in keys])
    return table, np.column_stack([*blocks, nxt]).astype(np.float64)


def load_sets(root: Path, mmlu_n: int) -> dict[str, OutcomeSet]:
    mmlu = root / "routellm" / "mmlu"
    return {
        "GSM8K": read_outcomes([root / "routellm" / "gsm8k" / "gsm8k_responses.csv"]),
        "MMLU": read_outcomes(
            [mmlu], exclude=mmlu / "contaminated_prompts.jsonl", sample=mmlu_n, seed=0
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_argument(parser)
    parser.add_argument("--mmlu-n", type=int, default=2000)
    parser.add_argument("--extract-only", action="store_true")
    parser.add_argument("--sets", default="GSM8K,MMLU", help="comma-separated: GSM8K, MMLU")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from probes.features import default_cache_dir
    from probes.probe import SparsityProbe
    from probes.types import ProbeSettings

    t0 = time.monotonic()
    wanted = args.sets.split(",")
    sets = {k: v for k, v in load_sets(data_root(args.data), args.mmlu_n).items() if k in wanted}
    probe = SparsityProbe(ProbeSettings())
    got = {}
    for name, data in sets.items():
        got[name] = probe_everything(probe, data.prompts, default_cache_dir() / "states" / name)
        print(f"{name}: {len(data)} prompts probed, {time.monotonic() - t0:.0f} s", flush=True)
    if args.extract_only:
        return 0
    return report(sets, got)


# -- routers scored on the cached rows ----------------------------------------------------------
Scorer = Callable[[NDArray[np.bool_], NDArray[np.bool_]], FloatArray]
C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def _lr_scores(
    X: FloatArray,
    y: NDArray[np.bool_],
    tr: NDArray[np.bool_],
    te: NDArray[np.bool_],
    c: float,
    pca: int | None,
) -> FloatArray:
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    steps: list[Any] = [StandardScaler()]
    if pca is not None and pca < X.shape[1]:
        steps.append(PCA(pca, random_state=0))
    steps.append(LogisticRegression(C=c, max_iter=2000))
    model = make_pipeline(*steps).fit(X[tr], y[tr])
    return np.asarray(model.decision_function(X[te]), dtype=np.float64)


def lr_router(data: OutcomeSet, X: FloatArray, pca: int | None = None) -> Scorer:
    """Standardised logistic regression for "large does better"; C by inner 3-fold APGR."""
    y = data.large_better

    def score(tr: NDArray[np.bool_], te: NDArray[np.bool_]) -> FloatArray:
        rows = np.flatnonzero(tr)
        inner = fold_ids(data.small[rows], data.large[rows], 3, seed=1)
        best, best_v = C_GRID[0], -np.inf
        for c in C_GRID:
            vals = []
            for k in range(3):
                itr = np.zeros_like(tr)
                ite = np.zeros_like(tr)
                itr[rows[inner != k]] = True
                ite[rows[inner == k]] = True
                s = _lr_scores(X, y, itr, ite, c, pca)
                vals.append(apgr(s, data.small[ite], data.large[ite]))
            if np.mean(vals) > best_v:
                best, best_v = c, float(np.mean(vals))
        return _lr_scores(X, y, tr, te, best, pca)

    return score


def knn_gain(
    Z: FloatArray, gain: FloatArray, tr: NDArray[np.bool_], rows: NDArray[np.bool_], k: int = 50
) -> FloatArray:
    """Mean gain (large - small) of the k most similar training prompts (self excluded)."""
    mu, sd = Z[tr].mean(0), Z[tr].std(0) + 1e-6
    A = (Z - mu) / sd
    A /= np.linalg.norm(A, axis=1, keepdims=True)
    sim = A[rows] @ A[tr].T
    src = np.flatnonzero(tr)
    for r, i in enumerate(np.flatnonzero(rows)):
        sim[r, src == i] = -np.inf
    top = np.argpartition(-sim, k, axis=1)[:, :k]
    return gain[src][top].mean(1)


def knn_router(data: OutcomeSet, Z: FloatArray, k: int = 50) -> Scorer:
    gain = data.large - data.small
    return lambda tr, te: knn_gain(Z, gain, tr, te, k)


def stacked_knn_router(data: OutcomeSet, X: FloatArray, Z: FloatArray, k: int = 50) -> Scorer:
    """LR on X plus the kNN gain (leave-one-out on the training rows, honest on the test rows)."""
    gain = data.large - data.small

    def score(tr: NDArray[np.bool_], te: NDArray[np.bool_]) -> FloatArray:
        col = np.zeros(len(gain))
        col[tr] = knn_gain(Z, gain, tr, tr, k)
        col[te] = knn_gain(Z, gain, tr, te, k)
        return lr_router(data, np.column_stack([X, col]))(tr, te)

    return score


def rank_average(*scorers: Scorer) -> Scorer:
    """Mean of the scorers' ranks on the test rows (their scales do not matter)."""
    from scipy.stats import rankdata

    def score(tr: NDArray[np.bool_], te: NDArray[np.bool_]) -> FloatArray:
        return np.mean([rankdata(s(tr, te)) for s in scorers], axis=0)

    return score


def cv(data: OutcomeSet, scorer: Scorer) -> tuple[float, float]:
    fold = fold_ids(data.small, data.large, 5, 0)
    vals = [
        apgr(scorer(fold != k, fold == k), data.small[fold == k], data.large[fold == k])
        for k in range(5)
    ]
    return float(np.mean(vals)), float(np.std(vals))


def routers(
    data: OutcomeSet, table: Any, S: FloatArray, E: FloatArray
) -> dict[str, Callable[[], tuple[float, float]]]:
    d = 576
    n = table.n_tokens.astype(float)
    log_n = np.log(n)[:, None]
    late = [i for i, f in enumerate(table.names) if parse(f)[0] >= 20 and parse(f)[1] in METRICS5]
    recipe = np.column_stack([table.values[:, late], log_n])
    layer = {la: S[:, 2 * j * d : 2 * (j + 1) * d] for j, la in enumerate(STATE_LAYERS)}
    mean = {la: v[:, :d] for la, v in layer.items()}
    nxt = S[:, 2 * len(STATE_LAYERS) * d :]
    out: dict[str, Callable[[], tuple[float, float]]] = {
        "length": lambda: cv(data, lambda tr, te: n[te]),
        "perplexity": lambda: cv(data, lambda tr, te: table.nll[te]),
        "MiniLM LR": lambda: cv(data, lr_router(data, E)),
        "recipe (shipped: L20-30 x 5 metrics x 2 pos + log n)": lambda: cv(
            data, lr_router(data, recipe)
        ),
        "next-token stats + log n": lambda: cv(
            data, lr_router(data, np.column_stack([nxt, log_n]))
        ),
        "recipe + next-token stats": lambda: cv(
            data, lr_router(data, np.column_stack([recipe, nxt]))
        ),
    }
    for la in STATE_LAYERS:
        out[f"probe states L{la} (mean+last) LR"] = lambda la=la: cv(
            data, lr_router(data, np.column_stack([layer[la], log_n]))
        )
        out[f"recipe + probe states L{la}"] = lambda la=la: cv(
            data, lr_router(data, np.column_stack([recipe, layer[la]]))
        )
        out[f"kNN(50) on L{la} mean state"] = lambda la=la: cv(data, knn_router(data, mean[la]))
    out["recipe + kNN(50) L18 mean"] = lambda: cv(data, stacked_knn_router(data, recipe, mean[18]))
    out["rank average: recipe + L30 LR, kNN(50) L12 mean"] = lambda: cv(
        data,
        rank_average(
            lr_router(data, np.column_stack([recipe, layer[30]])), knn_router(data, mean[12])
        ),
    )
    out["all states PCA64 + recipe"] = lambda: cv(
        data, lr_router(data, np.column_stack([recipe, S]), pca=64)
    )
    return out


def report(sets: dict[str, OutcomeSet], got: dict[str, tuple[Any, FloatArray]]) -> int:
    only = os.environ.get("ROUTERS")
    results: dict[str, dict[str, tuple[float, float]]] = {}
    for name, data in sets.items():
        table, S = got[name]
        E = embed_minilm(data.prompts)
        results[name] = {}
        for label, fn in routers(data, table, S, E).items():
            if only and not any(o in label for o in only.split(",")):
                continue
            t = time.monotonic()
            results[name][label] = fn()
            m, sd = results[name][label]
            print(
                f"{name:6} {m:.3f} ± {sd:.3f}  {label}  ({time.monotonic() - t:.0f} s)", flush=True
            )
    labels = list(dict.fromkeys(lab for r in results.values() for lab in r))
    print("\n| router (5-fold CV APGR ± sd) | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for lab in labels:
        cells = [
            f"{results[n][lab][0]:.3f} ± {results[n][lab][1]:.3f}" if lab in results[n] else ""
            for n in results
        ]
        print(f"| {lab} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
