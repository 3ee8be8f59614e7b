"""Nearest-neighbour vote: how much better the large model did on the most similar labelled prompts.

A :class:`NeighbourVote` keeps, for every labelled prompt of a supervised calibration, the
probe's pooled hidden vector at one layer (``L12.state.mean``: the token mean of layer 12) and the
gain of the large model over the small one on it (``large - small``: 1, 0 or -1 for right/wrong
outcomes).
A new prompt's vote is the mean gain of its ``k`` most similar labelled prompts (cosine similarity
after standardising each coordinate on the labelled prompts): RouteLLM's similarity-weighted idea
in the probe's own representation space. On RouteLLM MMLU it adds to the logistic regression of
:mod:`probes.supervised` what a linear model on the same vectors cannot (bench/results/
routing_eval.md, follow-up 4); the supervised model stacks the two, and with 2,500 labelled
prompts or more a second vote at another layer (follow-up 6).

Stored inside the calibration JSON, base64 (no pickle): the vectors as float16 (already
standardised and unit-length, so float16's 3 significant digits keep every similarity within
~1e-3), the per-coordinate centre and scale and the gains as float32. 1,319 GSM8K prompts x 576
coordinates take 2 MB of JSON; 6,000 MMLU prompts 9 MB. A vote on a live request is one
(n x width) float32 matrix-vector product and a partial sort: ~1 ms for 6,000 prompts.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from probes.feature_names import parse_state_block, state_block

__all__ = ["DEFAULT_K", "NeighbourVote", "decode_array", "encode_array"]

#: Neighbours averaged per vote (bench/routing_states.py: 50 on 1,000-6,000 labelled prompts).
DEFAULT_K: Final = 50
#: Rows compared per matrix product when voting for many prompts at once (bounds memory).
_CHUNK: Final = 1024

FloatArray = NDArray[np.float64]


def encode_array(values: NDArray[Any], dtype: str) -> str:
    """Base64 of ``values`` as little-endian ``dtype`` ("<f2", "<f4")."""
    return base64.b64encode(np.ascontiguousarray(values, dtype=dtype).tobytes()).decode("ascii")


def decode_array(text: str, dtype: str, count: int, what: str) -> NDArray[Any]:
    """The ``count`` values of ``dtype`` in base64 ``text`` (ValueError naming ``what``)."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError(f"{what} is not base64") from None
    size = np.dtype(dtype).itemsize
    if len(raw) != count * size:
        raise ValueError(f"{what} holds {len(raw) // size} values, expected {count}")
    return np.frombuffer(raw, dtype=dtype)


class NeighbourVote(BaseModel):
    """Mean gain of the ``k`` labelled prompts nearest to a prompt in the probe's state space."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    block: str = Field(description="the pooled hidden vector compared, e.g. 'L12.state.mean'")
    k: int = Field(DEFAULT_K, ge=1, description="neighbours averaged per vote")
    n: int = Field(ge=1, description="labelled prompts kept")
    width: int = Field(ge=1, description="coordinates per vector")
    center: str = Field(description="per-coordinate mean on the labelled prompts, base64 <f4")
    scale: str = Field(description="per-coordinate spread on the labelled prompts, base64 <f4")
    gains: str = Field(description="large - small outcome per labelled prompt, base64 <f4")
    vectors: str = Field(description="standardised unit vectors, n x width, base64 <f2")

    _center: NDArray[np.float32] = PrivateAttr()
    _scale: NDArray[np.float32] = PrivateAttr()
    _gains: NDArray[np.float32] = PrivateAttr()
    _vectors: NDArray[np.float32] = PrivateAttr()

    @model_validator(mode="after")
    def _decode(self) -> NeighbourVote:
        if parse_state_block(self.block) is None:
            raise ValueError(
                f"block {self.block!r} must look like 'L<layer>.state.<last|mean>', "
                "e.g. 'L12.state.mean'"
            )
        if self.k > self.n:
            raise ValueError(f"k = {self.k} neighbours, but only {self.n} labelled prompts kept")
        self._center = decode_array(self.center, "<f4", self.width, "center").astype(np.float32)
        self._scale = decode_array(self.scale, "<f4", self.width, "scale").astype(np.float32)
        if not (self._scale > 0).all():
            raise ValueError("every scale must be > 0")
        self._gains = decode_array(self.gains, "<f4", self.n, "gains").astype(np.float32)
        flat = decode_array(self.vectors, "<f2", self.n * self.width, "vectors")
        self._vectors = flat.astype(np.float32).reshape(self.n, self.width)
        return self

    @property
    def layer(self) -> int:
        """The layer whose hidden vectors are compared."""
        return self._where()[0]

    @property
    def key(self) -> str:
        """The vector's key in ``ProbeResult.states`` and ``FeatureTable.states`` ("L12.mean")."""
        return state_block(*self._where())

    def _where(self) -> tuple[int, str]:
        parsed = parse_state_block(self.block)
        assert parsed is not None  # checked in _decode
        return parsed

    @classmethod
    def fit(
        cls, vectors: NDArray[Any], gains: NDArray[Any], block: str, *, k: int = DEFAULT_K
    ) -> NeighbourVote:
        """Keep the labelled prompts' ``vectors`` (n x width) and their ``gains``."""
        Z = np.asarray(vectors, dtype=np.float64)
        g = np.asarray(gains, dtype=np.float64)
        if Z.ndim != 2 or Z.shape[0] != g.shape[0] or Z.shape[0] == 0:
            raise ValueError(f"vectors must be (n, width) with n = len(gains) > 0; got {Z.shape}")
        if not (np.isfinite(Z).all() and np.isfinite(g).all()):
            raise ValueError("vectors and gains must be finite")
        center = Z.mean(axis=0)
        scale = Z.std(axis=0)
        scale[~(scale > 1e-6)] = 1.0
        return cls(
            block=block,
            k=min(k, Z.shape[0]),
            n=Z.shape[0],
            width=Z.shape[1],
            center=encode_array(center, "<f4"),
            scale=encode_array(scale, "<f4"),
            gains=encode_array(g, "<f4"),
            vectors=encode_array(_unit(Z, center, scale), "<f2"),
        )

    def _similar(self, Z: NDArray[Any]) -> NDArray[np.float32]:
        Z = np.asarray(Z, dtype=np.float32)
        if Z.ndim != 2 or Z.shape[1] != self.width:
            raise ValueError(
                f"{self.block}: vectors of {self.width} coordinates expected, got shape {Z.shape}"
            )
        unit = _unit(Z, self._center, self._scale).astype(np.float32)
        return np.asarray(unit @ self._vectors.T, dtype=np.float32)

    def votes(self, vectors: NDArray[Any], *, exclude: NDArray[Any] | None = None) -> FloatArray:
        """The vote of each row of ``vectors`` (m x width); ``exclude[i]``, when given and >= 0,
        is a kept prompt row ``i`` may not count as its own neighbour (leave-one-out)."""
        Z = np.asarray(vectors)
        if Z.ndim != 2:
            self._similar(Z)  # raises the shape error
        out = np.empty(Z.shape[0], dtype=np.float64)
        for start in range(0, out.size, _CHUNK):
            sim = self._similar(Z[start : start + _CHUNK])
            if exclude is not None:
                rows = np.arange(sim.shape[0])
                own = np.asarray(exclude[start : start + _CHUNK], dtype=np.intp)
                hit = own >= 0
                sim[rows[hit], own[hit]] = -np.inf
            k = min(self.k, self.n - (1 if exclude is not None else 0))
            if k < 1:
                raise ValueError("a leave-one-out vote needs at least 2 labelled prompts")
            top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
            out[start : start + sim.shape[0]] = self._gains[top].mean(axis=1)
        return out

    def vote(self, vector: NDArray[Any] | tuple[float, ...]) -> float:
        """The vote for one prompt's pooled vector."""
        v = np.asarray(vector, dtype=np.float32)
        if v.ndim != 1 or v.size != self.width:
            raise KeyError(
                f"{self.block}: the vote reads {self.width} coordinates, the probe reports {v.size}"
            )
        return float(self.votes(v[None, :])[0])


def _unit(Z: NDArray[Any], center: NDArray[Any], scale: NDArray[Any]) -> NDArray[Any]:
    A = (Z - center) / scale
    norm = np.linalg.norm(A, axis=1, keepdims=True)
    return np.asarray(A / np.where(norm > 0, norm, 1.0))
