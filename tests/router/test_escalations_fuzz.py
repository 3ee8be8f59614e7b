"""Fuzzing the escalation API (schemathesis, from the gateway's OpenAPI document) on a gateway
with a human tier and a real queue: never a 5xx, every error an OpenAI envelope."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from policies.loader import parse_settings
from probes.probe import SparsityProbe
from router.app import create_app
from router.openapi import openapi_document
from tests.router.conftest import closed_port_url
from tests.router.escalation_helpers import REVIEWER, escalation_yaml
from tests.servers import ServerThread

SCHEMA = schemathesis.openapi.from_dict(openapi_document()).include(path_regex="escalations")


@pytest.fixture(scope="module")
def esc_gateway(
    tiny_model_dir: Path,
    tiny_probe: SparsityProbe,
    tiny_calibration: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    text = escalation_yaml(tiny_model_dir, tiny_calibration, closed_port_url())
    tmp = tmp_path_factory.mktemp("esc-fuzz")
    s = parse_settings(text, source_name="fuzz.yaml", base_dir=tmp)
    with ServerThread(create_app(s, probe=tiny_probe)) as gw:
        yield gw.url


@SCHEMA.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_escalation_api_has_no_server_errors(case: Any, esc_gateway: str) -> None:
    for headers in ({"authorization": f"Bearer {REVIEWER}"}, {}):
        response = case.call(base_url=esc_gateway, headers=headers, timeout=15)
        assert response.status_code < 500, (case.path, case.body, response.text[:300])
        if response.status_code >= 400:
            assert {"message", "type", "param", "code"} <= set(response.json()["error"])
