"""The feature table and its disk cache: sparsity metrics and the probe's hidden vectors."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from probes.feature_names import (
    expand_features,
    is_state_feature,
    parse_state_feature,
    state_feature,
)
from probes.features import extract
from probes.probe import SparsityProbe
from probes.types import ProbeSettings

PROMPTS = [
    "What is two plus two?",
    "Name three rivers in Europe and say which is longest.",
    "qz xv kk wp",
    "Explain photosynthesis to a child.",
    "What is two plus two?",  # a repeat: one pass, same row
]


@pytest.fixture
def counting_probe(tiny_model_dir: Path) -> tuple[SparsityProbe, list[int]]:
    """An every-layer probe of the tiny model that counts the prompts it runs."""
    probe = SparsityProbe(
        ProbeSettings(model=str(tiny_model_dir), layers=(1, 2, 3, 4), token_mean=True, device="cpu")
    )
    seen: list[int] = []
    inner = probe.hidden_states

    def counted(batch: Any) -> Any:
        seen.append(len(batch))
        return inner(batch)

    probe.hidden_states = counted  # type: ignore[method-assign]
    return probe, seen


def test_state_feature_names() -> None:
    assert state_feature(30, "last", 17) == "L30.state.last.17"
    assert parse_state_feature("L30.state.mean.5") == (30, "mean", 5)
    assert is_state_feature("L30.state.last.0") and not is_state_feature("L30.gini.last")
    for bad in ("L30.state.first.1", "L30.state.last.x", "30.state.last.1"):
        with pytest.raises(ValueError, match=re.escape("L<layer>.state.<last|mean>.<index>")):
            parse_state_feature(bad)
    expanded = expand_features(["L2.gini.last", "L4.state.mean", "log_tokens"], 3)
    assert expanded == (
        "L2.gini.last",
        "L4.state.mean.0",
        "L4.state.mean.1",
        "L4.state.mean.2",
        "log_tokens",
    )


def test_extract_keeps_hidden_vectors_and_caches_them(
    counting_probe: tuple[SparsityProbe, list[int]], tmp_path: Path
) -> None:
    probe, seen = counting_probe
    table = extract(probe, PROMPTS, cache_dir=tmp_path, state_layers=(4,))
    assert sum(seen) == 4  # the repeated prompt ran once
    assert set(table.states) == {"L4.last", "L4.mean"}
    assert table.states["L4.last"].shape == (5, 64)
    np.testing.assert_array_equal(table.states["L4.mean"][0], table.states["L4.mean"][4])
    # the same vectors a serving probe with state_layers reports
    serving = SparsityProbe(
        probe.settings.model_copy(update={"state_layers": (4,)}), loaded=probe.loaded
    )
    for i, result in enumerate(serving.measure(PROMPTS)):
        assert result.states is not None
        for block in ("L4.last", "L4.mean"):
            np.testing.assert_allclose(table.states[block][i], result.states[block], atol=1e-4)
    col = table.column("L4.state.last.7")
    np.testing.assert_array_equal(col, table.states["L4.last"][:, 7])
    assert table.matrix(["L4.state.mean.1", "L2.gini.last"]).shape == (5, 2)
    with pytest.raises(KeyError, match="layer 2's hidden vectors were not extracted"):
        table.column("L2.state.last.0")

    # a re-run reads everything from disk
    seen.clear()
    again = extract(probe, PROMPTS, cache_dir=tmp_path, state_layers=(4,))
    assert seen == []
    np.testing.assert_array_equal(again.states["L4.last"], table.states["L4.last"])
    np.testing.assert_array_equal(again.values, table.values)
    # without vectors: still nothing to probe, and no vectors in the table
    assert extract(probe, PROMPTS, cache_dir=tmp_path).states == {}
    assert seen == []
    # a layer whose vectors were never kept: those prompts are probed again, the rest reused
    both = extract(probe, PROMPTS, cache_dir=tmp_path, state_layers=(2, 4))
    assert sum(seen) == 4 and set(both.states) == {"L2.last", "L2.mean", "L4.last", "L4.mean"}
    np.testing.assert_allclose(both.states["L4.last"], table.states["L4.last"], atol=1e-5)
    seen.clear()
    extract(probe, PROMPTS[:2], cache_dir=tmp_path, state_layers=(2,))
    assert seen == []


def test_state_layers_must_be_probed(
    counting_probe: tuple[SparsityProbe, list[int]], tmp_path: Path
) -> None:
    probe, _ = counting_probe
    narrow = SparsityProbe(
        probe.settings.model_copy(update={"layers": (1, 2)}), loaded=probe.loaded
    )
    with pytest.raises(ValueError, match=r"state_layers \[4\] are not among the probe's layers"):
        extract(narrow, PROMPTS, cache_dir=tmp_path, state_layers=(4,))
