"""Fuzzing: schemathesis against the gateway's own OpenAPI document on a live port (no 5xx), and
hypothesis on raw request bodies (always a 4xx envelope or a 200) and on the config loader
(a Settings or a ConfigError naming the file, never another exception)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies.errors import ConfigError
from policies.loader import parse_settings
from policies.schema import Settings
from probes.probe import SparsityProbe
from router.app import create_app
from router.openapi import openapi_document
from tests.router.conftest import gateway_yaml
from tests.servers import FakeUpstream, ServerThread

SCHEMA = schemathesis.openapi.from_dict(openapi_document())


@pytest.fixture(scope="module")
def live_gateway(
    tiny_model_dir: Path,
    tiny_probe: SparsityProbe,
    tiny_calibration: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    upstreams: dict[str, tuple[FakeUpstream, ServerThread]] = {}
    gw: ServerThread | None = None
    try:
        for name in ("small", "large", "large2"):
            fake = FakeUpstream(name=name)
            upstreams[name] = (fake, ServerThread(fake).start())
        text = gateway_yaml(tiny_model_dir, tiny_calibration, upstreams)
        tmp = tmp_path_factory.mktemp("fuzz")
        s = parse_settings(text, source_name="fuzz.yaml", base_dir=tmp)
        gw = ServerThread(create_app(s, probe=tiny_probe)).start()
        yield gw.url
    finally:
        if gw is not None:
            gw.stop()
        for _fake, server in upstreams.values():
            server.stop()


def test_openapi_document_is_served(live_gateway: str) -> None:
    doc = httpx.get(live_gateway + "/openapi.json", timeout=10).json()
    assert doc == json.loads(json.dumps(openapi_document()))
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/readyz"} <= set(doc["paths"])


@SCHEMA.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_schemathesis_finds_no_server_error(case: Any, live_gateway: str) -> None:
    response = case.call(base_url=live_gateway, timeout=15)
    assert response.status_code < 500, (case.path, case.body, response.text[:300])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert {"message", "type", "param", "code"} <= set(error)


# -- raw request bodies -------------------------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def _deep(depth: int) -> bytes:
    return b'{"model":"auto","messages":' + b"[" * depth + b"]" * depth + b"}"


_bodies = st.one_of(
    st.binary(max_size=200),  # non-JSON, invalid UTF-8
    st.builds(lambda v: json.dumps(v).encode(), _json_values),  # wrong shapes and types
    st.builds(
        lambda m, msgs, stream: json.dumps(
            {"model": m, "messages": msgs, "stream": stream}
        ).encode(),
        _json_values | st.just("auto"),
        _json_values,
        _json_values | st.booleans(),
    ),
    st.integers(100, 100_000).map(_deep),  # deep nesting
    st.integers(70_000, 200_000).map(
        lambda n: json.dumps(
            {"model": "auto", "messages": [{"role": "user", "content": "x" * n}]}
        ).encode()
    ),  # huge strings, over max_body_bytes
    st.binary(min_size=1, max_size=30).map(
        lambda b: b'{"model":"auto","messages":[{"role":"user","content":"' + b"\xff" + b + b'"}]}'
    ),  # invalid UTF-8 inside a JSON string
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
)
@given(body=_bodies, path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/route"]))
def test_hostile_bodies_get_a_4xx_envelope(live_gateway: str, body: bytes, path: str) -> None:
    r = httpx.post(
        live_gateway + path, content=body, headers={"content-type": "application/json"}, timeout=15
    )
    assert r.status_code < 500, (body[:200], r.status_code, r.text[:300])
    if r.status_code != 200:
        assert 400 <= r.status_code < 500
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]


# -- the config loader --------------------------------------------------------------------------

_keys = st.sampled_from(
    [
        "server",
        "auth",
        "probe",
        "backends",
        "policies",
        "virtual_models",
        "cache",
        "type",
        "base_urls",
        "rules",
        "default",
        "on_probe_error",
        "keys",
        "rate_limit",
        "scope",
        "key",
        "when",
        "route",
        "share",
        "x",
        "requests_per_s",
        "burst",
        "openai",
        "small",
        "${HOME}",
    ]
)
_scalars = st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats() | st.text(max_size=12)
_trees = st.recursive(
    _scalars | _keys,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=5),
    max_leaves=30,
)
_BASE = {
    "backends": {"small": {"type": "openai", "base_urls": ["http://127.0.0.1:9/v1"]}},
    "policies": {"default": {"rules": [], "default": "small", "on_probe_error": "small"}},
}


def _mutated(tree: Any, at: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(json.dumps(_BASE))
    data[at] = tree
    return data


_documents = st.one_of(
    st.text(max_size=200),  # YAML-ish text
    st.builds(lambda t: yaml.safe_dump(t), _trees),
    st.builds(lambda t, k: yaml.safe_dump(_mutated(t, k)), _trees, _keys),
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
)
@given(text=_documents)
def test_config_loader_raises_only_config_errors(text: str) -> None:
    try:
        result = parse_settings(text, source_name="fuzz.yaml", env={"HOME": "/root"})
    except ConfigError as exc:
        assert "fuzz.yaml" in str(exc)
    else:
        assert isinstance(result, Settings)
