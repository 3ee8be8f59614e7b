"""Synthetic event logs with known statistics, for the experiments report's tests."""

from __future__ import annotations

from typing import Any

import numpy as np

from router.events import Event, event_from_record

__all__ = ["synthetic_log"]


def synthetic_log(seed: int = 0) -> tuple[list[Event], dict[str, np.ndarray]]:
    """Arm A: 400 requests, 300 small / 100 large, latencies 1..400 ms, cost 0.001 on small and
    0.01 on large, feedback N(0.6, 0.1) on every other request. Arm B: 400 requests, 200/200,
    latencies 2..800 ms (step 2), feedback N(0.7, 0.1) on every other request; 10 of B's
    requests failed (status 502, backend none)."""
    rng = np.random.default_rng(seed)
    records: list[dict[str, Any]] = []
    scores: dict[str, np.ndarray] = {}
    for arm, n_small, step, mean in (("A", 300, 1, 0.6), ("B", 200, 2, 0.7)):
        fb = rng.normal(mean, 0.1, 200)
        scores[arm] = fb
        for i in range(400):
            backend = "small" if i < n_small else "large"
            failed = arm == "B" and i >= 390
            rid = f"{arm}{i}"
            records.append(
                {
                    "kind": "request",
                    "request_id": rid,
                    "time": float(i),
                    "experiment": "exp",
                    "arm": arm,
                    "backend": None if failed else backend,
                    "latency_s": (i + 1) * step / 1000,
                    "status": 502 if failed else 200,
                    "cost": None if failed else (0.001 if backend == "small" else 0.01),
                }
            )
            if i % 2 == 0:
                records.append(
                    {
                        "kind": "feedback",
                        "request_id": rid,
                        "score": float(fb[i // 2]),
                        "label": None,
                    }
                )
    # noise: another experiment, a request without arm, feedback for unknown ids
    records.append({"kind": "request", "request_id": "x", "experiment": "other", "arm": "A"})
    records.append({"kind": "request", "request_id": "y", "experiment": "exp", "arm": None})
    records.append({"kind": "feedback", "request_id": "zzz", "score": 100.0, "label": "spam"})
    # read back as a sink's records would be
    return [e for r in records if (e := event_from_record(r)) is not None], scores
