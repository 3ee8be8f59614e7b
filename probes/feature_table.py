"""A table of probe features over many prompts, without torch.

:func:`probes.features.extract` builds a :class:`FeatureTable` by running the probe; offline
evaluation and supervised fitting only read one, so this module needs numpy alone. Column names
follow :mod:`probes.feature_names`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from probes.feature_names import is_state_feature, parse_state_feature, state_block

__all__ = ["FeatureTable", "FloatArray"]

FloatArray = NDArray[np.float64]


@dataclass(slots=True)
class FeatureTable:
    """Features of n prompts: ``values[:, j]`` is feature ``names[j]``."""

    names: tuple[str, ...]
    values: FloatArray  # (n, k)
    n_tokens: FloatArray  # (n,)
    truncated: NDArray[np.bool_]  # (n,)
    nll: FloatArray  # (n,) mean NLL of the prompt under the probe's LM head (nan: not computed)
    states: dict[str, NDArray[np.float32]] = field(default_factory=dict)  # "L30.last" -> (n, d)

    def column(self, name: str) -> FloatArray:
        if is_state_feature(name):
            layer, position, index = parse_state_feature(name)
            block = self.states.get(state_block(layer, position))
            if block is None:
                raise KeyError(f"{name}: layer {layer}'s hidden vectors were not extracted")
            return block[:, index].astype(np.float64)
        return self.values[:, self.names.index(name)]

    def matrix(self, names: Sequence[str]) -> FloatArray:
        """The columns ``names`` side by side (KeyError/ValueError for one not in the table)."""
        if not names:
            return np.zeros((len(self), 0))
        return np.column_stack([self.column(n) for n in names])

    def __len__(self) -> int:
        return int(self.values.shape[0])
