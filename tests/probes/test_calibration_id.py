"""``Calibration.id``: a short digest of the content, the same after a save and a load, another
one when the content changes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from probes.calibration import Calibration
from probes.supervised import LENGTH_FEATURE, SupervisedModel
from probes.types import ProbeResult


def _calibration() -> Calibration:
    rng = np.random.default_rng(0)
    results = [
        ProbeResult(n_tokens=int(n), score=float(s), metrics={1: {"top1_energy": float(s)}})
        for n, s in zip(rng.integers(3, 60, 40), rng.random(40), strict=True)
    ]
    return Calibration.fit(results, {"model": "m", "metric": "top1_energy"}, min_per_bucket=10)


def test_the_id_is_twelve_hex_digits_and_survives_save_and_load(tmp_path: Path) -> None:
    calibration = _calibration()
    assert re.fullmatch(r"[0-9a-f]{12}", calibration.id)
    path = calibration.save(tmp_path / "c.json")
    loaded = Calibration.load(path)
    assert loaded.id == calibration.id
    # the file re-indented (or its keys reordered) is the same content
    data = json.loads(path.read_text())
    path.write_text(json.dumps(dict(reversed(data.items())), indent=4))
    assert Calibration.load(path).id == calibration.id
    assert Calibration.load(loaded.save(tmp_path / "again.json")).id == calibration.id


def test_the_id_changes_with_the_content(tmp_path: Path) -> None:
    calibration = _calibration()
    model = SupervisedModel.fit(
        np.log(np.arange(2, 42, dtype=float))[:, None],
        np.arange(40) % 2 == 0,
        (LENGTH_FEATURE,),
        l2=1.0,
    )
    supervised = calibration.model_copy(update={"supervised": model})
    assert supervised.id != calibration.id  # a copy computes its own id
    assert calibration.model_copy().id == calibration.id
    path = calibration.save(tmp_path / "c.json")
    data = json.loads(path.read_text())
    data["stats"]["mean"] += 1e-9
    path.write_text(json.dumps(data))
    assert Calibration.load(path).id != calibration.id
