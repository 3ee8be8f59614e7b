"""The supervised recipes on a vLLM probe: the project's plugin (plugins/vllm_probe) serving the
feature model, against the in-process probe, on 200 prompts and their answers.

ONE real vLLM server (CPU build, the plugin installed by scripts/vllm_venv.sh) runs the feature
folder that ``sparsity-router derive-probe`` builds for a probe reading both default recipes:
the prompt recipe (sparsity of layers 20-30 at the last token and averaged over tokens, hidden
vectors of layer 30, a neighbour vote on layer 12's token mean) and the cascade's answer recipe
(layers 2-12, layer 12's vectors and vote). Checked:

* every feature (each metric at each layer, last token and token mean; each hidden-vector
  coordinate) equals the local probe's within 1e-3, on 200 prompts and on the 200 prompt +
  answer conversations a cascade reads, measured 16 at a time; the last-token outlier fraction,
  a count in steps of 1/576, may differ by one coordinate on its threshold (seen once on
  benchmark answers: bench/results/vllm_equivalence.md);
* P(large) of a default prompt calibration and of a default answer calibration (fitted here
  with ``calibrate --labels``'s code on the local probe) equal within 1e-3;
* the gateway with ``probe.backend: vllm`` routes on them: the ``x-router-p-large`` and
  ``x-router-answer-p-large`` headers the official openai SDK reads (plain and streamed) match
  the local probe's values, and the route follows them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from evaluation.outcomes import OutcomeSet
from policies.loader import parse_settings
from policies.schema import Settings
from probes.answers import answer_input
from probes.calibration import Calibration
from probes.derived import served_name
from probes.probe import SparsityProbe
from probes.types import ProbeInput
from router.app import create_app
from router.events import RequestEvent, SQLiteSink, read_events
from router.remote_probe import RemoteProbe
from tests.e2e.conftest import START_TIMEOUT_S, vllm_provisioned
from tests.e2e.equivalence import Measured, default_calibration, measure_both, worst_differences
from tests.e2e.prompts import PROMPTS_WITH_ANSWERS
from tests.e2e.vllm_server import VllmServer, wait_healthy
from tests.servers import FakeUpstream, ServerThread

TOLERANCE = 1e-3
LAYERS = [*range(2, 13), *range(20, 31)]  # the answer recipe's 2-12 and the prompt recipe's 20-30

PROBE = f"""
probe:
  backend: vllm
  vllm: {{base_url: "{{url}}", timeout_s: 60}}
  layers: {LAYERS}
  score_layer: 10
  token_mean: true
  state_layers: [12, 30]
  device: cpu
  timeout_s: 60
"""


def _settings(url: str, tail: str = "", base: Path | None = None) -> Settings:
    text = PROBE.replace("{url}", url) + (
        tail
        or """
backends:
  small: {type: openai, base_urls: ["http://127.0.0.1:9/v1"], model: small}
policies:
  default: {default: small, on_probe_error: small}
"""
    )
    return parse_settings(text, source_name="features-e2e.yaml", base_dir=base)


def _conversation(item: ProbeInput) -> list[dict[str, str]]:
    return [{"role": "user", "content": item}] if isinstance(item, str) else list(item)  # type: ignore[arg-type]


PROMPT_INPUTS: list[ProbeInput] = [p for p, _ in PROMPTS_WITH_ANSWERS]
ANSWER_INPUTS: list[ProbeInput] = [
    answer_input("chat/completions", _conversation(p), a) for p, a in PROMPTS_WITH_ANSWERS
]


@pytest.fixture(scope="module")
def feature_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """The feature probe server for :data:`PROBE`, stopped (whole process group) whatever
    happens."""
    vllm_provisioned()
    base = tmp_path_factory.mktemp("features")
    config = base / "probe.yaml"
    config.write_text(_settings_text_for_server())
    server = VllmServer("features", base, "--enforce-eager", env={"PROBE_CONFIG": str(config)})
    try:
        server.launch()
        wait_healthy([server], START_TIMEOUT_S)
        print(f"\nvLLM feature probe healthy after {server.started_s:.0f} s")
        yield server
    finally:
        server.stop()


def _settings_text_for_server() -> str:
    return PROBE.replace("{url}", "http://127.0.0.1:9/v1") + (
        "backends:\n  small: {type: openai, base_urls: ['http://127.0.0.1:9/v1'], model: s}\n"
        "policies:\n  default: {default: small, on_probe_error: small}\n"
    )


@pytest.fixture(scope="module")
def local(feature_server: VllmServer) -> SparsityProbe:
    return SparsityProbe(_settings(feature_server.url).probe.probe_settings())


@pytest.fixture(scope="module")
def remote(feature_server: VllmServer) -> RemoteProbe:
    section = _settings(feature_server.url).probe
    assert section.vllm is not None
    return RemoteProbe(section.probe_settings(), section.vllm)


@pytest.fixture(scope="module")
def prompts(local: SparsityProbe, remote: RemoteProbe) -> Measured:
    return measure_both(local, remote, PROMPT_INPUTS)


@pytest.fixture(scope="module")
def answers(local: SparsityProbe, remote: RemoteProbe) -> Measured:
    return measure_both(local, remote, ANSWER_INPUTS)


@pytest.mark.parametrize("which", ["prompts", "answers"])
def test_every_feature_equals_the_local_probe(which: str, request: pytest.FixtureRequest) -> None:
    measured: Measured = request.getfixturevalue(which)
    assert len(measured.inputs) == 200
    assert sum(r.truncated for r in measured.local) >= 5  # the tail cut is exercised
    worst = worst_differences(measured)
    print(
        f"\n{which}: 200 inputs, vLLM feature probe at 16 concurrent: "
        f"{200 / measured.remote_s:.1f}/s; worst |local - vLLM|: "
        + ", ".join(f"{k} {v:.2g}" for k, v in worst.items())
    )
    flips = worst.pop("outlier_frac flips")
    assert flips <= 1  # a coordinate on the threshold (see tests/e2e/equivalence.COUNTED)
    for kind, diff in worst.items():
        assert diff <= TOLERANCE, (kind, diff)


def _labels(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Made-up outcomes, both classes: the small model fails the arithmetic (seeds 0-7) and the
    long forms, and one in five others; the large one never fails."""
    small = np.ones(n)
    for i in range(n):
        seed, form = divmod(i, 4)
        if seed < 8 or form == 3 or i % 5 == 0:
            small[i] = 0.0
    return small, np.ones(n)


def _calibration(local: SparsityProbe, measured: Measured, *, answers: bool) -> Calibration:
    """A default supervised calibration (the recipe and fit of ``calibrate --labels``), fitted
    on the local probe's results and :func:`_labels`."""
    small, large = _labels(len(measured.inputs))
    data = OutcomeSet(
        prompts=[str(x) for x in measured.inputs],
        small=small,
        large=large,
        groups=["e2e"] * len(small),
        answers=[a for _, a in PROMPTS_WITH_ANSWERS] if answers else None,
        inputs=measured.inputs,
    )
    return default_calibration(local, measured.local, data)


@pytest.fixture(scope="module")
def calibrations(
    local: SparsityProbe,
    prompts: Measured,
    answers: Measured,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("calibrations")
    out = {}
    for which, measured in (("prompt", prompts), ("answer", answers)):
        calibration = _calibration(local, measured, answers=which == "answer")
        out[which] = calibration.save(base / f"{which}.json")
    return out


@pytest.mark.parametrize("which", ["prompt", "answer"])
def test_p_large_equals_the_local_probe(
    which: str, calibrations: dict[str, Path], prompts: Measured, answers: Measured
) -> None:
    calibration = Calibration.load(calibrations[which])
    assert calibration.supervised is not None
    measured = prompts if which == "prompt" else answers
    want = np.array([calibration.with_percentile(r).p_large for r in measured.local], float)
    got = np.array([calibration.with_percentile(r).p_large for r in measured.remote], float)
    assert not np.isnan(want).any() and not np.isnan(got).any()
    assert want.std() > 0.01  # a fitted model, not a constant
    worst = float(np.abs(want - got).max())
    print(f"\n{which} calibration: worst |P(large) local - vLLM| over 200: {worst:.2g}")
    assert worst <= TOLERANCE


GATEWAY_TAIL = """
calibration: {{path: "{prompt}", answer_path: "{answer}"}}
backends:
  small: {{type: openai, base_urls: ["{small}"], model: small}}
  large: {{type: openai, base_urls: ["{large}"], model: large}}
policies:
  default:
    rules:
      - {{name: large-helps, when: {{p_large: {{min: {threshold}}}}}, route: large}}
    default: small
    on_probe_error: small
    cascade: {{backend: small, escalate_to: large, when: {{p_large: {{min: {answer_threshold}}}}},
               on_probe_error: keep}}
events: {{sink: sqlite, path: "{events}"}}
"""


def test_gateway_routes_and_cascades_on_the_vllm_probe(
    feature_server: VllmServer,
    calibrations: dict[str, Path],
    prompts: Measured,
    answers: Measured,
    tmp_path: Path,
) -> None:
    """The supervised prompt router and the cascade's answer check, both on the vLLM probe,
    through the gateway with the openai SDK: headers and routes follow the local probe, and
    /metrics and the events store record what the headers said."""
    prompt_cal = Calibration.load(calibrations["prompt"])
    answer_cal = Calibration.load(calibrations["answer"])
    p_prompt = [prompt_cal.with_percentile(r).p_large for r in prompts.local]
    p_answer = [answer_cal.with_percentile(r).p_large for r in answers.local]
    threshold = float(np.median(p_prompt))
    answer_threshold = float(np.median(p_answer))
    replies = {str(_conversation(p)[-1]["content"]): a for p, a in PROMPTS_WITH_ANSWERS}
    small = FakeUpstream(name="small", reply=lambda body: replies[body["messages"][-1]["content"]])
    upstreams = {
        "small": ServerThread(small).start(),
        "large": ServerThread(FakeUpstream(name="large")).start(),
    }
    try:
        tail = GATEWAY_TAIL.format(
            prompt=calibrations["prompt"],
            answer=calibrations["answer"],
            small=upstreams["small"].url + "/v1",
            large=upstreams["large"].url + "/v1",
            threshold=threshold,
            answer_threshold=answer_threshold,
            events=tmp_path / "events.sqlite",
        )
        settings = _settings(feature_server.url, tail, base=tmp_path)
        assert settings.probe.backend == "vllm"
        gateway = ServerThread(create_app(settings)).start(timeout=120)
        try:
            client = openai.OpenAI(
                base_url=gateway.url + "/v1", api_key="none", max_retries=0, timeout=120
            )
            routes: dict[str, int] = {}
            seen: dict[str, dict[str, str]] = {}  # request id -> the x-router headers
            for i in range(0, 200, 10):  # 20 requests, every form; every other one streamed
                messages = _conversation(prompts.inputs[i])
                stream = i % 20 == 10
                raw = client.chat.completions.with_raw_response.create(
                    model="auto",
                    messages=messages,
                    stream=stream,  # type: ignore[arg-type]
                )
                h = raw.headers
                seen[h["x-request-id"]] = {k: v for k, v in h.items() if k.startswith("x-router")}
                body = raw.parse()
                if stream:
                    text = "".join(c.choices[0].delta.content or "" for c in body if c.choices)  # type: ignore[union-attr]
                else:
                    text = body.choices[0].message.content or ""  # type: ignore[union-attr]
                assert text, h
                assert float(h["x-router-p-large"]) == pytest.approx(
                    p_prompt[i], abs=TOLERANCE + 5e-5
                )
                if abs(p_prompt[i] - threshold) > TOLERANCE:
                    if p_prompt[i] >= threshold:
                        assert h["x-router-backend"] == "large" and "x-router-cascade" not in h
                        routes["large"] = routes.get("large", 0) + 1
                        continue
                    # routed small: the cascade read the small model's answer on the vLLM probe
                    assert float(h["x-router-answer-p-large"]) == pytest.approx(
                        p_answer[i], abs=TOLERANCE + 5e-5
                    )
                    if abs(p_answer[i] - answer_threshold) > TOLERANCE:
                        kept = p_answer[i] < answer_threshold
                        assert h["x-router-cascade"] == ("kept" if kept else "escalated"), dict(h)
                        assert h["x-router-backend"] == ("small" if kept else "large")
                        key = "kept" if kept else "escalated"
                        routes[key] = routes.get(key, 0) + 1
            print(f"\ngateway on the vLLM feature probe, 20 requests: {routes}")
            assert len(routes) >= 2, routes
            metrics = httpx.get(gateway.url + "/metrics", timeout=10).text
        finally:
            gateway.stop()  # flushes the event log
    finally:
        for server in upstreams.values():
            server.stop()
    _check_metrics_and_events(metrics, seen, tmp_path / "events.sqlite")


def _check_metrics_and_events(metrics: str, seen: dict[str, dict[str, str]], events: Path) -> None:
    """What /metrics counted and the events store kept equal what the clients were told."""
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
    }

    def total(name: str, **labels: str) -> float:
        return sum(
            v
            for (n, ls), v in samples.items()
            if n == name and all((k, labels[k]) in ls for k in labels)
        )

    backends = [h["x-router-backend"] for h in seen.values()]
    for backend in ("small", "large"):
        counted = total("sparsity_router_requests_total", backend=backend, status="200")
        assert counted == backends.count(backend), (backend, counted)
    verdicts = [h["x-router-cascade"] for h in seen.values() if "x-router-cascade" in h]
    for verdict in ("kept", "escalated"):
        assert total("sparsity_router_cascades_total", verdict=verdict) == verdicts.count(verdict)
    assert total("sparsity_router_probe_errors_total") == 0
    sink = SQLiteSink(events)
    try:
        recorded = {e.request_id: e for e in read_events(sink) if isinstance(e, RequestEvent)}
    finally:
        sink.close()
    assert recorded.keys() == seen.keys()
    for request_id, h in seen.items():
        event = recorded[request_id]
        assert event.backend == h["x-router-backend"] and event.status == 200
        assert event.cascade == h.get("x-router-cascade")
        if "x-router-answer-p-large" in h:
            assert event.answer_p_large == pytest.approx(
                float(h["x-router-answer-p-large"]), abs=5e-5
            )
        assert event.score == pytest.approx(float(h["x-router-score"]), abs=5e-6)


def test_served_name_is_what_the_gateway_expects(
    feature_server: VllmServer, remote: RemoteProbe
) -> None:
    assert remote.model_name == served_name(remote.settings)
    assert "-L2-12_20-30x7m-tm-S12_30-" in remote.model_name


def test_the_cascade_example_runs_this_probe_section() -> None:
    """config/examples/vllm-cascade.yaml is the probe section measured here."""
    from policies.loader import load_settings
    from tests.e2e.vllm_server import ROOT

    example = load_settings(ROOT / "config/examples/vllm-cascade.yaml", env={})
    tested = _settings("http://127.0.0.1:9/v1").probe
    keys = ("layers", "score_layer", "token_mean", "state_layers", "metrics", "max_tokens")
    assert {k: getattr(example.probe, k) for k in keys} == {k: getattr(tested, k) for k in keys}
    assert example.probe.backend == "vllm"
