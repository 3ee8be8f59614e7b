"""Gateway fixtures: fake OpenAI upstreams and the gateway itself, each on a real loopback port."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from policies.loader import parse_settings
from probes.answers import answer_input
from probes.calibration import Calibration
from probes.probe import SparsityProbe
from probes.supervised import LENGTH_FEATURE, SupervisedModel
from router.app import create_app
from tests.servers import FakeUpstream, ServerPool, ServerThread

REFERENCE = [
    f"{a} {b} question number {i}?"
    for i, (a, b) in enumerate(
        (a, b)
        for a in (
            "What is",
            "How many",
            "Translate",
            "Explain",
            "Why do",
            "Bonjour",
            "qz xv",
            "Janet has",
        )
        for b in (
            "eggs",
            "the fox",
            "two plus two",
            "le monde",
            "lazy dogs",
            "kk wp tt",
            "16 eggs",
            "hello",
        )
    )
]


def closed_port_url() -> str:
    """A loopback URL where nothing listens (connection refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="session")
def tiny_calibration(tiny_probe: SparsityProbe, tmp_path_factory: pytest.TempPathFactory) -> Path:
    results = tiny_probe.measure(REFERENCE)
    path = tmp_path_factory.mktemp("calib") / "tiny.json"
    Calibration.fit(results, tiny_probe.fingerprint(), min_per_bucket=16).save(path)
    return path


@pytest.fixture
def upstreams() -> Iterator[dict[str, tuple[FakeUpstream, ServerThread]]]:
    started: dict[str, tuple[FakeUpstream, ServerThread]] = {}
    try:
        for name in ("small", "large", "large2"):
            fake = FakeUpstream(name=name)
            started[name] = (fake, ServerThread(fake).start())
        yield started
    finally:
        for _fake, server in started.values():
            server.stop()


def probe_yaml(tiny_model_dir: Path, calibration: Path, extra: str = "") -> str:
    """The ``probe`` (the tiny model at three layers, ``extra`` keys added) and ``calibration``
    sections of the test gateways' YAML."""
    keys = "".join(f"  {line}\n" for line in extra.splitlines())
    return (
        f'probe:\n  model: "{tiny_model_dir}"\n  layers: [1, 2, -1]\n  token_mean: true\n'
        f'  timeout_s: 10\n{keys}calibration: {{path: "{calibration}"}}'
    )


# The policy of the test gateways: the sparser half of prompts to large.
SPARSE_POLICY = """policies:
  default:
    rules:
      - {name: sparse, when: {share: 0.5}, route: large}
    default: small
    on_probe_error: large"""


def gateway_yaml(
    tiny_model_dir: Path,
    calibration: Path,
    upstreams: dict[str, tuple[FakeUpstream, ServerThread]],
    *,
    large_urls: list[str] | None = None,
    extra: str = "",
    large_timeouts: str = "",
    api_keys: str = "[]",
) -> str:
    small_url = upstreams["small"][1].url + "/v1"
    large = large_urls or [upstreams["large"][1].url + "/v1", upstreams["large2"][1].url + "/v1"]
    urls = ", ".join(f'"{u}"' for u in large)
    return f"""
server: {{max_body_bytes: 65536}}
auth: {{api_keys: {api_keys}}}
{probe_yaml(tiny_model_dir, calibration)}
backends:
  small: {{type: openai, base_urls: ["{small_url}"], model: small-served, models: [small-direct]}}
  large:
    type: openai
    base_urls: [{urls}]
    model: large-served
    fallback: [small]
    {large_timeouts}
{SPARSE_POLICY}
{extra}
"""


@pytest.fixture
def serve_yaml(
    tiny_probe: SparsityProbe, tmp_path: Path
) -> Iterator[Callable[[str], ServerThread]]:
    """Start a gateway (sharing the tiny probe) from YAML text on a loopback port; every
    gateway started is stopped after the test."""
    with ServerPool() as pool:

        def start(text: str) -> ServerThread:
            settings = parse_settings(text, source_name="gateway.yaml", base_dir=tmp_path)
            return pool.start(ServerThread(create_app(settings, probe=tiny_probe)))

        yield start


@pytest.fixture
def make_gateway(
    tiny_model_dir: Path,
    tiny_calibration: Path,
    upstreams: dict[str, tuple[FakeUpstream, ServerThread]],
    serve_yaml: Callable[[str], ServerThread],
) -> Callable[..., ServerThread]:
    def make(**kwargs: Any) -> ServerThread:
        return serve_yaml(gateway_yaml(tiny_model_dir, tiny_calibration, upstreams, **kwargs))

    return make


#: What the fake small model answers: briefly (the small model was fine) or at length (the
#: large one does better), for the answer calibrations of the cascade tests.
SHORT_ANSWER = "Yes."
LONG_ANSWER = " ".join(["I am not sure, let me think about this step by step once more."] * 6)


def fit_answer_calibration(tiny_probe: SparsityProbe, path: Path) -> SupervisedModel:
    """An answer calibration saved at ``path``: P(large does better) rises with the length of
    prompt + answer, fitted on the reference prompts answered briefly or at length."""
    probe = SparsityProbe(
        tiny_probe.settings.model_copy(update={"layers": (1,)}), loaded=tiny_probe.loaded
    )
    inputs = [
        answer_input(
            "chat/completions",
            [{"role": "user", "content": p}],
            LONG_ANSWER if i % 2 else SHORT_ANSWER,
        )
        for i, p in enumerate(REFERENCE)
    ]
    results = probe.measure(inputs)
    X = np.log([[r.n_tokens] for r in results])
    y = np.arange(len(results)) % 2 == 1
    model = SupervisedModel.fit(X, y, (LENGTH_FEATURE,), l2=1.0).model_copy(
        update={"reads": "answer"}
    )
    Calibration.fit(results, probe.fingerprint(), min_per_bucket=16).model_copy(
        update={"supervised": model}
    ).save(path)
    return model
