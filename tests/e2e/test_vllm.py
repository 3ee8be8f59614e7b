"""The gateway against real vLLM servers: the remote probe and the openai-compatible backends.

One generation server serves SmolLM2-135M-Instruct under two names, ``small`` and ``large`` (both
backends point at it); one pooling server runs the probe's derived layer-10 model. Requests go
through the gateway with the official ``openai`` SDK, streamed and not.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from policies.loader import parse_settings
from policies.schema import VllmProbeSettings
from probes.probe import SparsityProbe
from probes.types import ProbeInput, ProbeSettings
from router.app import create_app
from router.remote_probe import RemoteProbe, RemoteProbeError
from tests.e2e.conftest import VllmServers
from tests.router.conftest import closed_port_url
from tests.servers import ServerThread

PROMPTS: list[ProbeInput] = [
    "What is two plus two?",
    "qz xv kk wp tt ff 77 ## lorem zzgl ptarmigan",
    "Bonjour, peux-tu m'expliquer la photosynthèse en deux phrases ?",
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Translate to German: the lazy dog sleeps."},
    ],
    [
        {"role": "user", "content": "Janet has 16 eggs."},
        {"role": "assistant", "content": "Okay."},
        {"role": "user", "content": "She eats 3 and bakes with 4. How many are left to sell?"},
    ],
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n# what does this do?" * 4,
]
TOLERANCE = 1e-3
SERVED = {"small", "large"}  # the generation server's names, one per backend


@pytest.fixture(scope="module")
def local_probe() -> SparsityProbe:
    return SparsityProbe(ProbeSettings(device="cpu"))


def test_remote_probe_matches_local(vllm_servers: VllmServers, local_probe: SparsityProbe) -> None:
    remote = RemoteProbe(
        local_probe.settings, VllmProbeSettings(base_url=vllm_servers.probe.url, timeout_s=60)
    )
    assert remote.fingerprint() == local_probe.fingerprint()
    worst = 0.0
    for item in PROMPTS:
        want = local_probe.measure_one(item)
        got = remote.measure_one(item)
        assert got.n_tokens == want.n_tokens
        assert set(got.metrics) == set(want.metrics) == {10}
        for name, value in want.metrics[10].items():
            diff = abs(got.metrics[10][name] - value)
            worst = max(worst, diff)
            assert diff <= TOLERANCE, (item, name, value, got.metrics[10][name])
        assert got.score == pytest.approx(want.score, abs=TOLERANCE)
    # Shown with -s (the figure the README quotes).
    print(f"\nmax |local - vLLM| metric difference: {worst:.3g} over {len(PROMPTS)} prompts")


def test_remote_probe_truncates_like_local(vllm_servers: VllmServers) -> None:
    settings = ProbeSettings(device="cpu", max_tokens=24)
    local = SparsityProbe(settings)
    remote = RemoteProbe(settings, VllmProbeSettings(base_url=vllm_servers.probe.url))
    item = PROMPTS[-1]
    want, got = local.measure_one(item), remote.measure_one(item)
    assert want.truncated and got.truncated and got.n_tokens == want.n_tokens == 24
    assert got.score == pytest.approx(want.score, abs=TOLERANCE)


def test_remote_probe_rejects_a_server_for_another_layer(vllm_servers: VllmServers) -> None:
    remote = RemoteProbe(
        ProbeSettings(device="cpu", layers=(12,)),
        VllmProbeSettings(base_url=vllm_servers.probe.url),
    )
    with pytest.raises(RemoteProbeError, match=r"L12of30.*probes\.derived.*--layer 12"):
        remote.measure_one("hello")


def test_remote_probe_server_down_is_a_clear_error() -> None:
    remote = RemoteProbe(
        ProbeSettings(device="cpu"), VllmProbeSettings(base_url=closed_port_url(), timeout_s=2)
    )
    with pytest.raises(RemoteProbeError, match="check that it runs"):
        remote.measure_one("hello")


# -- the gateway -------------------------------------------------------------------------------


def _gateway_yaml(servers: VllmServers, probe_url: str) -> str:
    gen = servers.generate.url
    return f"""
probe:
  backend: vllm
  vllm: {{base_url: "{probe_url}", timeout_s: 30}}
  layers: [10]
  device: cpu
  timeout_s: 60
backends:
  small: {{type: openai, base_urls: ["{gen}"], model: small, timeouts: {{read_s: 120}}}}
  large: {{type: openai, base_urls: ["{gen}"], model: large, timeouts: {{read_s: 120}}}}
policies:
  default:
    rules:
      - {{name: asked-large, when: {{header: {{x-tier: large}}}}, route: large}}
      - {{name: long, when: {{n_tokens: {{min: 120}}}}, route: large}}
    default: small
    on_probe_error: small
"""


@pytest.fixture(scope="module")
def gateway(vllm_servers: VllmServers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    text = _gateway_yaml(vllm_servers, vllm_servers.probe.url)
    base = tmp_path_factory.mktemp("gw")
    settings = parse_settings(text, source_name="vllm-e2e.yaml", base_dir=Path(base))
    server = ServerThread(create_app(settings)).start(timeout=120)
    try:
        yield server.url
    finally:
        server.stop()


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=180)


def test_auto_through_gateway_not_streamed(gateway: str, local_probe: SparsityProbe) -> None:
    question = "What is the capital of France? Answer in one word."
    raw = _client(gateway).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": question}], max_tokens=12
    )
    completion = raw.parse()
    assert raw.headers["x-router-backend"] == "small"
    assert raw.headers["x-router-rule"] == "default"
    # The score came from the vLLM pooling server and equals the local probe's.
    want = local_probe.measure_one([{"role": "user", "content": question}]).score
    assert float(raw.headers["x-router-score"]) == pytest.approx(want, abs=TOLERANCE)
    assert completion.model in SERVED
    assert completion.choices[0].message.content
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_auto_through_gateway_streamed_to_large(gateway: str) -> None:
    stream = _client(gateway).chat.completions.with_raw_response.create(
        model="auto",
        messages=[{"role": "user", "content": "Count from one to five."}],
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-tier": "large"},
    )
    assert stream.headers["x-router-backend"] == "large"
    assert stream.headers["content-type"].startswith("text/event-stream")
    text, models, usage = "", set(), None
    for chunk in stream.parse():
        models.add(chunk.model)
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            usage = chunk.usage
    assert text.strip()
    assert models <= SERVED  # vLLM names its first served name in answers, whichever was asked
    assert usage is not None and usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 16


def test_long_prompt_routes_large_by_probe_token_count(gateway: str) -> None:
    long_text = "Summarise: " + "the quick brown fox jumps over the lazy dog. " * 20
    raw = _client(gateway).completions.with_raw_response.create(
        model="auto", prompt=long_text, max_tokens=8
    )
    assert raw.headers["x-router-backend"] == "large", dict(raw.headers)
    assert raw.headers["x-router-rule"] == "long"
    completion = raw.parse()
    assert completion.model in SERVED and completion.choices[0].text
    assert completion.usage is not None and completion.usage.completion_tokens > 0


def test_models_lists_auto_and_both_backends(gateway: str) -> None:
    client = _client(gateway)
    models = {m.id: m for m in client.models.list()}
    assert {"auto", "small", "large"} <= set(models)
    assert (models["auto"].model_extra or {}).get("router", {}).get("type") == "virtual"
    # A listed backend model name goes straight to that backend, past probe and policy.
    raw = client.chat.completions.with_raw_response.create(
        model="large", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert raw.headers["x-router-backend"] == "large" and raw.parse().model in SERVED


def test_probe_server_down_goes_to_on_probe_error(
    vllm_servers: VllmServers, tmp_path: Path
) -> None:
    text = _gateway_yaml(vllm_servers, closed_port_url())
    settings = parse_settings(text, source_name="vllm-e2e.yaml", base_dir=tmp_path)
    server = ServerThread(create_app(settings)).start(timeout=120)
    try:
        r = httpx.post(
            server.url + "/v1/chat/completions",
            json={
                "model": "auto",
                "messages": [{"role": "user", "content": "Say hi."}],
                "max_tokens": 4,
            },
            timeout=180,
        )
        assert r.status_code == 200, r.text
        assert r.headers["x-router-backend"] == "small"
        assert r.headers["x-router-probe-error"] == "1"
        assert r.json()["usage"]["completion_tokens"] > 0
    finally:
        server.stop()


# -- a cascade: the real small model's answer read through the remote probe -------------------


def _answer_calibration(local: SparsityProbe, path: Path) -> None:
    """An answer calibration on layer 10's sparsity + length (what the pooling probe reports):
    the large model "does better" when the answer ran long. Fitted on reference conversations
    with answers of 0-79 words."""
    import numpy as np

    from probes.answers import answer_input
    from probes.calibration import Calibration
    from probes.supervised import LENGTH_FEATURE, SupervisedModel

    words = [k % 80 for k in range(0, 160, 2)]
    inputs = [
        answer_input(
            "chat/completions", [{"role": "user", "content": f"Question {i}?"}], "ok " + "word " * k
        )
        for i, k in enumerate(words)
    ]
    results = local.measure(inputs)
    names = ("L10.top1_energy.last", LENGTH_FEATURE)
    X = np.array([[r.value(10, "top1_energy"), np.log(r.n_tokens)] for r in results])
    model = SupervisedModel.fit(X, np.array(words) >= 30, names, l2=0.01)
    Calibration.fit(results, local.fingerprint(), min_per_bucket=16).model_copy(
        update={"supervised": model.model_copy(update={"reads": "answer"})}
    ).save(path)


def test_cascade_checks_the_real_small_answer(
    vllm_servers: VllmServers, local_probe: SparsityProbe, tmp_path: Path
) -> None:
    probe = SparsityProbe(
        local_probe.settings.model_copy(update={"layers": (10,)}), loaded=local_probe.loaded
    )
    _answer_calibration(probe, tmp_path / "answers.json")
    text = (
        _gateway_yaml(vllm_servers, vllm_servers.probe.url)
        .replace(
            "policies:",
            'calibration: {answer_path: "answers.json"}\npolicies:',
        )
        .replace(
            "    on_probe_error: small\n",
            "    on_probe_error: small\n    cascade: {backend: small, escalate_to: large, "
            "when: {p_large: {min: 0.5}}, on_probe_error: escalate}\n",
        )
    )
    settings = parse_settings(text, source_name="vllm-e2e.yaml", base_dir=tmp_path)
    server = ServerThread(create_app(settings)).start(timeout=120)
    try:
        client = _client(server.url)
        short = client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": "Say yes."}], max_tokens=2
        )
        assert short.headers["x-router-cascade"] == "kept", dict(short.headers)
        assert float(short.headers["x-router-answer-p-large"]) < 0.5
        assert short.parse().choices[0].message.content
        long = client.chat.completions.with_raw_response.create(
            model="auto",
            messages=[{"role": "user", "content": "Write a long story about a dragon."}],
            max_tokens=64,
            stream=True,
        )
        assert long.headers["x-router-cascade"] == "escalated", dict(long.headers)
        assert long.headers["x-router-backend"] == "large"
        assert float(long.headers["x-router-answer-p-large"]) >= 0.5
        text_out = "".join(c.choices[0].delta.content or "" for c in long.parse() if c.choices)
        assert text_out.strip()
    finally:
        server.stop()
