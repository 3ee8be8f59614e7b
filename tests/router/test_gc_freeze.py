"""``create_app(freeze_gc=True)``: the start-up heap leaves the cyclic GC's full collections."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from policies.loader import parse_settings
from probes.probe import SparsityProbe
from router.app import create_app
from tests.router.conftest import gateway_yaml
from tests.servers import FakeUpstream, ServerThread


@pytest.fixture
def unfreeze() -> Iterator[None]:
    """The test process must not keep its heap frozen for the tests that follow."""
    try:
        yield
    finally:
        gc.unfreeze()


@pytest.mark.usefixtures("unfreeze")
@pytest.mark.parametrize("freeze", [False, True])
def test_freeze_gc_after_start_up(
    freeze: bool,
    tiny_probe: SparsityProbe,
    tiny_model_dir: Path,
    tiny_calibration: Path,
    upstreams: dict[str, tuple[FakeUpstream, ServerThread]],
    tmp_path: Path,
) -> None:
    gc.unfreeze()
    text = gateway_yaml(tiny_model_dir, tiny_calibration, upstreams)
    settings = parse_settings(text, source_name="gateway.yaml", base_dir=tmp_path)
    app = create_app(settings, probe=tiny_probe, freeze_gc=freeze)
    with ServerThread(app) as gw:
        frozen = gc.get_freeze_count()
        assert (frozen > 0) is freeze  # off by default: the process owner asks for it
        r = httpx.post(
            gw.url + "/v1/chat/completions",
            json={"model": "auto", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.status_code == 200 and r.headers["x-router-backend"] in ("small", "large")
