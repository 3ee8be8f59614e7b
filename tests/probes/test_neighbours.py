"""The nearest-neighbour vote: known answers on hand-made vectors, leave-one-out, storage."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from probes.neighbours import NeighbourVote, decode_array, encode_array


def clusters(n: int = 60, width: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two tight clusters: the large model helps (+1) in the first, hurts (-1) in the second."""
    rng = np.random.default_rng(seed)
    a = np.zeros(width)
    a[0] = 5.0
    b = np.zeros(width)
    b[1] = 5.0
    Z = np.vstack([a + 0.1 * rng.normal(size=(n, width)), b + 0.1 * rng.normal(size=(n, width))])
    gains = np.concatenate([np.ones(n), -np.ones(n)])
    return Z.astype(np.float32), gains


def test_votes_are_the_mean_gain_of_the_nearest() -> None:
    Z, gains = clusters()
    vote = NeighbourVote.fit(Z, gains, "L12.state.mean", k=10)
    assert (vote.layer, vote.key, vote.n, vote.width, vote.k) == (12, "L12.mean", 120, 8, 10)
    probe_a = Z[:1] + 0.05
    probe_b = Z[-1:] - 0.05
    assert vote.votes(np.vstack([probe_a, probe_b])).tolist() == [1.0, -1.0]
    # a point between the clusters, nearer the first: all 10 neighbours from the first
    assert vote.vote(tuple(0.6 * Z[0] + 0.4 * Z[-1])) == 1.0


def test_k_mixes_the_clusters_in_proportion() -> None:
    Z, gains = clusters(n=30, width=2)  # no noise dimensions to blur the clusters
    vote = NeighbourVote.fit(Z, gains, "L3.state.last", k=40)
    # 30 neighbours of the own cluster, then 10 of the other: (30 - 10) / 40
    assert vote.vote(Z[0]) == pytest.approx(0.5)


def test_leave_one_out_excludes_the_row_itself() -> None:
    rng = np.random.default_rng(1)
    Z = rng.normal(size=(50, 6)).astype(np.float32)
    gains = np.zeros(50)
    gains[7] = 1.0  # only prompt 7 gained
    vote = NeighbourVote.fit(Z, gains, "L2.state.mean", k=1)
    assert vote.votes(Z[7:8]).tolist() == [1.0]  # its own nearest neighbour is itself
    assert vote.votes(Z[7:8], exclude=np.array([7])).tolist() == [0.0]
    # exclude = -1: nothing excluded for that row
    assert vote.votes(Z[7:8], exclude=np.array([-1])).tolist() == [1.0]
    everyone = vote.votes(Z, exclude=np.arange(50))
    assert everyone[7] == 0.0 and everyone.shape == (50,)
    alone = NeighbourVote.fit(Z[:1], gains[:1], "L2.state.mean")
    assert alone.k == 1 and alone.votes(Z[3:4]).tolist() == [0.0]
    with pytest.raises(ValueError, match="at least 2 labelled prompts"):
        alone.votes(Z[:1], exclude=np.array([0]))


def test_matches_brute_force_cosine_after_standardising() -> None:
    rng = np.random.default_rng(2)
    Z = (rng.normal(size=(300, 20)) * rng.uniform(0.1, 10, size=20)).astype(np.float32)
    gains = rng.integers(-1, 2, size=300).astype(float)
    vote = NeighbourVote.fit(Z[:250], gains[:250], "L5.state.mean", k=15)
    A = (Z - Z[:250].mean(0)) / Z[:250].std(0)
    A /= np.linalg.norm(A, axis=1, keepdims=True)
    sim = A[250:] @ A[:250].T
    expected = np.array([gains[np.argsort(-s)[:15]].mean() for s in sim])
    got = vote.votes(Z[250:])
    # float16 storage may swap a neighbour at the boundary, rarely
    assert np.mean(np.abs(got - expected) > 1e-6) <= 0.04
    assert np.abs(got - expected).max() <= 2 / 15 + 1e-6


def test_json_round_trip_keeps_every_vote() -> None:
    Z, gains = clusters()
    vote = NeighbourVote.fit(Z, gains, "L12.state.mean", k=5)
    text = vote.model_dump_json()
    assert set(json.loads(text)) == {
        "block", "k", "n", "width", "center", "scale", "gains", "vectors",
    }  # fmt: skip
    again = NeighbourVote.model_validate_json(text)
    assert again.votes(Z).tolist() == vote.votes(Z).tolist()


def test_invalid_votes_are_refused_with_the_field() -> None:
    Z, gains = clusters(n=5)
    good = json.loads(NeighbourVote.fit(Z, gains, "L12.state.mean", k=3).model_dump_json())
    cases = [
        ({"block": "L12.mean"}, "must look like 'L<layer>.state"),
        ({"k": 11}, "only 10 labelled prompts"),
        ({"gains": encode_array(np.ones(9), "<f4")}, "gains holds 9 values, expected 10"),
        ({"vectors": "%%%"}, "vectors is not base64"),
        ({"scale": encode_array(np.zeros(8), "<f4")}, "every scale must be > 0"),
    ]
    for change, message in cases:
        with pytest.raises(ValidationError, match=message):
            NeighbourVote.model_validate({**good, **change})
    with pytest.raises(ValueError, match="n = len"):
        NeighbourVote.fit(Z, gains[:3], "L12.state.mean")
    with pytest.raises(ValueError, match="finite"):
        NeighbourVote.fit(np.full_like(Z, np.nan), gains, "L12.state.mean")


def test_a_vector_of_the_wrong_width_is_a_key_error() -> None:
    Z, gains = clusters(n=5)
    vote = NeighbourVote.fit(Z, gains, "L12.state.mean", k=3)
    with pytest.raises(KeyError, match="reads 8 coordinates, the probe reports 4"):
        vote.vote((0.0,) * 4)
    with pytest.raises(ValueError, match="8 coordinates expected"):
        vote.votes(np.zeros((2, 4)))


def test_encode_decode() -> None:
    values = np.array([1.5, -2.0, 3.25])
    assert decode_array(encode_array(values, "<f2"), "<f2", 3, "x").tolist() == [1.5, -2.0, 3.25]
    with pytest.raises(ValueError, match="x holds 3 values, expected 4"):
        decode_array(encode_array(values, "<f4"), "<f4", 4, "x")
