"""Hostile and odd requests from the hardening report against 431b115, kept as regressions.

The gateway runs on a real port; the official openai SDK is the client where one is involved
(raw bytes go through the SDK's own ``post``, as the Node SDK or curl would send them).

- lone UTF-16 surrogates anywhere in a body: a 400 naming the JSON path, never a 500;
- content the OpenAI API rejects (parts that are not typed objects, text parts without string
  text, a message without content): a 400 naming the field, never routed;
- valid content without text (images, audio, files, blank text): routed on purpose by the
  policy's ``on_no_text`` (rule ``no_text``) or a ``has_text: false`` rule, never probed, never
  a probe error, no WARNING per request; what the probe still refuses is logged once a minute;
- routes: with auth off ``/admin/*`` answers only 127.0.0.1/::1; with auth on ``/metrics``
  needs a metrics or admin key (unless ``auth.public_metrics``), ``/openapi.json`` a client key.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from policies.engine import NO_TEXT_RULE, PolicyEngine, RequestContext
from policies.errors import ConfigError
from policies.loader import parse_settings
from probes.errors import ProbeInputError
from probes.probe import SparsityProbe
from router.errors import BadRequest
from router.guard import is_local_client
from router.logthrottle import ThrottledLog
from router.requests import parse_request
from router.routes.feedback import parse_feedback
from tests.router.conftest import gateway_yaml
from tests.servers import FakeUpstream, ServerThread

Upstreams = dict[str, tuple[FakeUpstream, ServerThread]]
MakeGateway = Callable[..., ServerThread]

USER_HI = {"role": "user", "content": "hi"}
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
AUDIO = {"type": "input_audio", "input_audio": {"data": "UklGRiQAAABXQVZF", "format": "wav"}}
FILE = {"type": "file", "file": {"file_id": "file-abc123"}}


def sdk(gw: ServerThread, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=20)


def post_raw(gw: ServerThread, path: str, raw: bytes) -> httpx.Response:
    """POST raw JSON bytes through the SDK (its JSON encoder cannot write a lone surrogate; the
    Node SDK's ``JSON.stringify`` and curl can)."""
    with sdk(gw) as c:
        return c.post(
            path,
            cast_to=httpx.Response,
            content=raw,
            options={"headers": {"content-type": "application/json"}},
        )


def bad_request(call: Callable[[], object]) -> dict[str, Any]:
    """The error object of the 400 ``call`` must raise, after the SDK-level checks."""
    with pytest.raises(openai.BadRequestError) as info:
        call()
    exc = info.value
    assert exc.status_code == 400
    error: dict[str, Any] = exc.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" == exc.type
    assert exc.param == error["param"] and exc.code == error["code"]
    assert error["param"] and error["param"] in error["message"]
    return error


def create(gw: ServerThread, messages: list[Any], model: str = "auto", **kw: Any) -> Any:
    with sdk(gw) as c:
        return c.chat.completions.with_raw_response.create(model=model, messages=messages, **kw)


@pytest.fixture
def quiet_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Captures WARNING and above; a test asserts what (if anything) was logged."""
    with caplog.at_level(logging.WARNING):
        yield caplog


def _loud(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= level]


# -- 2. lone surrogates ---------------------------------------------------------------------------

CHAT_SURROGATE = b'{"model":"auto","messages":[{"role":"user","content":"\\ud800"}]}'


@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        ("/chat/completions", CHAT_SURROGATE, "messages[0].content"),
        ("/completions", b'{"model":"auto","prompt":"ok \\ud800"}', "prompt"),
        ("/route", CHAT_SURROGATE, "messages[0].content"),
        (
            "/chat/completions",
            b'{"model":"small","messages":[{"role":"user","content":"hi"}],"x_extra":"\\udfff"}',
            "x_extra",
        ),
        (
            "/chat/completions",
            b'{"model":"auto","messages":[{"role":"user","content":'
            b'[{"type":"text","text":"fine"},{"type":"text","text":"a\\uDC00b"}]}]}',
            "messages[0].content[1].text",
        ),
        (
            "/chat/completions",
            b'{"model":"auto","messages":[{"role":"user","content":"hi"}],'
            b'"metadata":{"\\ud83d":"x"}}',
            'metadata["\\ud83d"]',
        ),
        (  # a pair in the wrong order is two lone surrogates
            "/chat/completions",
            b'{"model":"small","messages":[{"role":"user","content":"\\ude00\\ud83d"}]}',
            "messages[0].content",
        ),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_the_field_not_a_500(
    make_gateway: MakeGateway,
    upstreams: Upstreams,
    quiet_log: pytest.LogCaptureFixture,
    path: str,
    raw: bytes,
    param: str,
) -> None:
    gw = make_gateway()
    error = bad_request(lambda: post_raw(gw, path, raw))
    assert error["param"] == param and error["code"] == "invalid_unicode"
    assert "surrogate" in error["message"]
    assert not _loud(quiet_log, logging.ERROR)
    assert all(not fake.requests for fake, _server in upstreams.values())


def test_an_escaped_surrogate_pair_is_valid_text(
    make_gateway: MakeGateway, upstreams: Upstreams
) -> None:
    gw = make_gateway()
    raw = b'{"model":"small","messages":[{"role":"user","content":"smile \\ud83d\\ude00"}]}'
    response = post_raw(gw, "/chat/completions", raw)
    assert response.status_code == 200
    assert (
        upstreams["small"][0].requests[-1]["body"]["messages"][0]["content"] == "smile \U0001f600"
    )


# -- 5. content the API rejects: a 400 before any routing -----------------------------------------


@pytest.mark.parametrize(
    ("messages", "param", "code"),
    [
        ([{"role": "user", "content": [42]}], "messages[0].content[0]", "invalid_type"),
        ([{"role": "user", "content": [["a"]]}], "messages[0].content[0]", "invalid_type"),
        (
            [{"role": "user", "content": [{"type": "text", "text": "ok"}, "loose"]}],
            "messages[0].content[1]",
            "invalid_type",
        ),
        (
            [{"role": "user", "content": [{"text": "no type"}]}],
            "messages[0].content[0].type",
            "missing_required_parameter",
        ),
        (
            [{"role": "user", "content": [{"type": 3}]}],
            "messages[0].content[0].type",
            "invalid_type",
        ),
        (
            [{"role": "user", "content": [{"type": "text"}]}],
            "messages[0].content[0].text",
            "missing_required_parameter",
        ),
        (
            [{"role": "user", "content": [{"type": "text", "text": ["x"]}]}],
            "messages[0].content[0].text",
            "invalid_type",
        ),
        ([{"role": "user", "content": []}], "messages[0].content", "empty_array"),
        ([{"role": "user"}], "messages[0].content", "missing_required_parameter"),
        ([{"role": "user", "content": None}], "messages[0].content", "missing_required_parameter"),
        (
            [{"role": "system", "content": "be brief"}, {"role": "assistant"}, USER_HI],
            "messages[1].content",
            "missing_required_parameter",
        ),
        ([{"role": "user", "content": 7}], "messages[0].content", "invalid_type"),
    ],
)
@pytest.mark.parametrize("model", ["auto", "small"])
def test_content_the_api_rejects_is_a_400_naming_the_field(
    make_gateway: MakeGateway,
    upstreams: Upstreams,
    quiet_log: pytest.LogCaptureFixture,
    messages: list[Any],
    param: str,
    code: str,
    model: str,
) -> None:
    gw = make_gateway()
    error = bad_request(lambda: create(gw, messages, model=model))
    assert (error["param"], error["code"]) == (param, code)
    assert all(not fake.requests for fake, _server in upstreams.values())
    assert not _loud(quiet_log)


def test_what_the_api_accepts_keeps_working(
    make_gateway: MakeGateway, upstreams: Upstreams
) -> None:
    """Tool calls with null content, the legacy function_call, n=2, image parts beside text and
    unknown fields, as held in the report."""
    gw = make_gateway()
    tool_turn = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, cloudy"},
    ]
    legacy = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "function_call": {"name": "w", "arguments": "{}"}},
        {"role": "function", "name": "w", "content": None},
    ]
    mixed = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, IMAGE]}]
    cases: list[tuple[list[Any], dict[str, Any]]] = [
        (tool_turn, {}),
        (legacy, {}),
        ([USER_HI], {"n": 2}),
        (mixed, {"extra_body": {"x_custom": {"kept": True}}}),
    ]
    for messages, extra in cases:
        raw = create(gw, messages, **extra)
        assert raw.http_response.status_code == 200
        assert raw.headers["x-router-rule"] not in ("on_probe_error", NO_TEXT_RULE)
        assert "x-router-probe-error" not in raw.headers and "x-router-score" in raw.headers
        sent = [r["body"] for fake, _ in upstreams.values() for r in fake.requests]
        matching = [body for body in sent if body["messages"] == messages]
        assert len(matching) == 1  # forwarded as sent (large has two replicas)
        assert all(matching[0][k] == v for k, v in extra.get("extra_body", {}).items())
        if "n" in extra:
            assert matching[0]["n"] == 2


# -- 5. valid content without text: routed on purpose ---------------------------------------------


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": [IMAGE]}],
        [{"role": "user", "content": [AUDIO]}],
        [{"role": "user", "content": [FILE, {"type": "text", "text": "  \n"}]}],
        [{"role": "user", "content": "   "}],
        [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "x"}}]}],
    ],
)
def test_text_free_content_goes_to_the_default_by_rule_no_text(
    make_gateway: MakeGateway,
    upstreams: Upstreams,
    quiet_log: pytest.LogCaptureFixture,
    messages: list[Any],
) -> None:
    """Before: the probe error path, i.e. the large model chosen by any client, and a WARNING
    per request."""
    gw = make_gateway()
    for _ in range(3):
        raw = create(gw, messages)
        assert raw.http_response.status_code == 200
        assert (raw.headers["x-router-backend"], raw.headers["x-router-rule"]) == (
            "small",
            "no_text",
        )
        assert "x-router-probe-error" not in raw.headers and "x-router-score" not in raw.headers
    assert upstreams["small"][0].requests[-1]["body"]["messages"] == messages
    assert not upstreams["large"][0].requests and not upstreams["large2"][0].requests
    metrics = httpx.get(gw.url + "/metrics", timeout=10).text
    assert "sparsity_router_probe_errors_total{" not in metrics
    assert not _loud(quiet_log)


def test_blank_prompt_and_dry_run_report_no_text(make_gateway: MakeGateway) -> None:
    gw = make_gateway()
    with sdk(gw) as c:
        raw = c.completions.with_raw_response.create(model="auto", prompt="")
    assert raw.headers["x-router-rule"] == "no_text" and raw.headers["x-router-backend"] == "small"
    routed = post_raw(
        gw,
        "/route",
        b'{"model":"auto","messages":[{"role":"user","content":[{"type":"input_audio",'
        b'"input_audio":{"data":"AAAA","format":"wav"}}]}]}',
    ).json()
    decision = routed["decision"]
    assert decision["rule"] == "no_text" and decision["probe_error"] is False
    assert routed["probe"] is None and "no text" in decision["reason"]


def test_on_no_text_and_a_has_text_rule_route_text_free_requests(
    tiny_model_dir: Path,
    tiny_calibration: Path,
    upstreams: Upstreams,
    serve_yaml: Callable[[str], ServerThread],
) -> None:
    text = gateway_yaml(tiny_model_dir, tiny_calibration, upstreams)
    before = "      - {name: sparse, when: {share: 0.5}, route: large}\n"
    after = "    default: small\n    on_probe_error: large\n"
    assert before in text and after in text
    text = text.replace(
        before,
        "      - {name: artist, when: {has_text: false, user: artist}, route: small}\n" + before,
    ).replace(after, "    default: small\n    on_probe_error: small\n    on_no_text: large\n")
    gw = serve_yaml(text)
    pictures = [{"role": "user", "content": [IMAGE]}]
    raw = create(gw, pictures)
    assert (raw.headers["x-router-backend"], raw.headers["x-router-rule"]) == ("large", "no_text")
    raw = create(gw, pictures, user="artist")
    assert (raw.headers["x-router-backend"], raw.headers["x-router-rule"]) == ("small", "artist")
    raw = create(gw, [{"role": "user", "content": "a question with text"}], user="artist")
    assert raw.headers["x-router-rule"] in ("sparse", "default") and "x-router-score" in raw.headers


def test_on_no_text_names_known_backends() -> None:
    base = """
backends: {small: {type: openai, base_urls: ["http://127.0.0.1:9/v1"]}}
policies: {default: {rules: [], default: small, on_probe_error: small, on_no_text: %s}}
"""
    settings = parse_settings(base % "{route: small}", source_name="ok.yaml")
    assert settings.policies["default"].on_no_text is not None
    with pytest.raises(ConfigError) as exc:
        parse_settings(base % "vision", source_name="bad.yaml")
    assert "policies.default.on_no_text" in str(exc.value) and "'vision'" in str(exc.value)


def test_engine_routes_text_free_requests_without_the_probe() -> None:
    settings = parse_settings(
        """
backends:
  small: {type: openai, base_urls: ["http://127.0.0.1:9/v1"]}
  large: {type: openai, base_urls: ["http://127.0.0.1:9/v1"], fallback: [small]}
  vision: {type: openai, base_urls: ["http://127.0.0.1:9/v1"], fallback: [small]}
policies:
  plain: {rules: [{name: gold, when: {header: {x-tier: gold}}, route: large}], default: small,
          on_probe_error: large}
  pics:
    rules:
      - {name: gold, when: {header: {x-tier: gold}}, route: large}
      - {name: texty, when: {has_text: true, user: bob}, route: large}
      - {name: sparse, when: {score: {min: 0}}, route: large}
    default: small
    on_probe_error: large
    on_no_text: vision
virtual_models: {auto: {policy: pics}}
""",
        source_name="engine.yaml",
    )
    engine = PolicyEngine(settings)
    none = RequestContext(has_text=False)
    d = engine.decide("plain", None, none)
    assert (d.backend, d.rule, d.probe_error) == ("small", "no_text", False)
    d = engine.decide("pics", None, none, probe_failed=True)
    assert (d.backend, d.fallbacks, d.rule, d.probe_error) == (
        "vision",
        ("small",),
        "no_text",
        False,
    )
    assert "rule sparse needs the probe" in d.reason
    gold = RequestContext(has_text=False, headers={"x-tier": "gold"})
    assert engine.decide("pics", None, gold).rule == "gold"  # request-side rules still apply
    d = engine.decide("pics", None, RequestContext(has_text=False, user="bob"))
    assert d.rule == "no_text"  # has_text: true does not match
    d = engine.decide("pics", None, RequestContext(user="bob"))
    assert d.rule == "texty"  # request-side rule, text present
    d = engine.decide("pics", None, RequestContext(), probe_failed=True)
    assert (d.backend, d.rule, d.probe_error) == ("large", "on_probe_error", True)


def test_parse_request_reports_text() -> None:
    def parsed(content: Any) -> bool:
        body = f'{{"model": "auto", "messages": [{{"role": "user", "content": {content}}}]}}'
        return parse_request("chat/completions", body.encode()).has_text

    assert parsed('"hi"') and parsed('[{"type": "text", "text": "hi"}, {"type": "image_url"}]')
    assert not parsed('"  "') and not parsed('[{"type": "image_url", "image_url": {}}]')
    assert not parse_request("completions", b'{"model": "a", "prompt": ["", " "]}').has_text


def test_what_the_probe_still_refuses_is_logged_once_a_minute(
    make_gateway: MakeGateway,
    tiny_probe: SparsityProbe,
    monkeypatch: pytest.MonkeyPatch,
    quiet_log: pytest.LogCaptureFixture,
) -> None:
    def refuse(*args: object, **kwargs: object) -> object:
        raise ProbeInputError("input 0 tokenizes to nothing: nothing to probe")

    gw = make_gateway()  # warmed up before the probe starts refusing
    for name in ("encode", "measure", "measure_one"):  # wherever the probe reads the input
        monkeypatch.setattr(tiny_probe, name, refuse)
    for i in range(5):
        raw = create(gw, [{"role": "user", "content": f"unreadable {i}"}])
        assert raw.headers["x-router-rule"] == "on_probe_error"
    lines = _loud(quiet_log)
    assert len(lines) == 1, lines
    assert lines[0].startswith("router.probing: the probe refused 1 input(s)")


def test_throttled_log_counts_what_it_did_not_write(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    log = ThrottledLog(
        logging.getLogger("tests.throttle"), "%d in %.0f s: %s", 60, clock=lambda: now[0]
    )
    with caplog.at_level(logging.WARNING, logger="tests.throttle"):
        assert log.event("a")
        assert not any(log.event("b") for _ in range(4))
        now[0] += 61
        assert log.event("c")
    assert [r.getMessage() for r in caplog.records] == ["1 in 60 s: a", "5 in 60 s: c"]


# -- 11. who may call which route ---------------------------------------------------------------


def from_address(address: str) -> httpx.Client:
    """An HTTP client whose connections leave from ``address`` (inside 127.0.0.0/8)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=10)


def test_admin_routes_answer_only_local_clients_with_auth_off(make_gateway: MakeGateway) -> None:
    gw = make_gateway()
    with from_address("127.0.0.2") as other:
        r = other.post(gw.url + "/admin/reload")
        assert r.status_code == 403, r.text
        error = r.json()["error"]
        assert (error["type"], error["code"]) == ("permission_error", "loopback_only")
        # the rest stays open with auth off
        assert other.get(gw.url + "/metrics").status_code == 200
        assert other.get(gw.url + "/healthz").status_code == 200
    with from_address("127.0.0.1") as local:  # passes the door; no config file to reload
        r = local.post(gw.url + "/admin/reload")
        assert r.status_code == 404 and r.json()["error"]["code"] == "no_config_file"


@pytest.mark.parametrize(
    ("client", "local"),
    [
        (("127.0.0.1", 5000), True),
        (("::1", 5000), True),
        (("::ffff:127.0.0.1", 5000), True),
        (("127.0.0.2", 5000), False),
        (("203.0.113.7", 5000), False),
        (("::ffff:203.0.113.7", 5000), False),
        (("testclient", 50000), False),
        (None, False),
    ],
)
def test_is_local_client(client: tuple[str, int] | None, local: bool) -> None:
    assert is_local_client({"type": "http", "client": client}) is local


KEYS = (
    '["client-k"], keys: [{key: metrics-k, scope: metrics, name: prom}, '
    "{key: admin-k, scope: admin, name: ops}, {key: rev-k, scope: reviewer, name: rev}]"
)


def _get(gw: ServerThread, path: str, key: str | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.get(gw.url + path, headers=headers, timeout=10)


def test_metrics_and_openapi_need_a_key_with_auth_on(make_gateway: MakeGateway) -> None:
    gw = make_gateway(api_keys=KEYS)
    keys = (None, "client-k", "rev-k", "metrics-k", "admin-k")
    expect: dict[str, dict[str | None, int]] = {
        "/metrics": dict(zip(keys, (401, 403, 403, 200, 200), strict=True)),
        "/openapi.json": dict(zip(keys, (401, 200, 403, 403, 200), strict=True)),
        "/healthz": {None: 200},
        "/readyz": {None: 200},
    }
    for path, by_key in expect.items():
        for key, status in by_key.items():
            r = _get(gw, path, key)
            assert r.status_code == status, (path, key, r.text)
            if status == 401:
                assert r.json()["error"]["type"] == "authentication_error"
            elif status == 403:
                assert r.json()["error"]["code"] == "insufficient_scope"
    assert "sparsity_router_requests_total" in _get(gw, "/metrics", "metrics-k").text
    # with auth on, an admin key may reload from anywhere; a metrics key may not
    with from_address("127.0.0.2") as other:
        headers = {"authorization": "Bearer admin-k"}
        r = other.post(gw.url + "/admin/reload", headers=headers)
        assert r.status_code == 404 and r.json()["error"]["code"] == "no_config_file"
        r = other.post(gw.url + "/admin/reload", headers={"authorization": "Bearer metrics-k"})
        assert r.status_code == 403
    # the openai SDK: a metrics key is no client key
    with pytest.raises(openai.PermissionDeniedError):
        sdk(gw, "metrics-k").chat.completions.create(
            model="small", messages=[{"role": "user", "content": "hi"}]
        )


def test_public_metrics_opens_only_metrics(make_gateway: MakeGateway) -> None:
    gw = make_gateway(api_keys='["client-k"], public_metrics: true')
    assert _get(gw, "/metrics").status_code == 200
    assert _get(gw, "/openapi.json").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        sdk(gw).models.list()


def test_feedback_with_a_lone_surrogate_is_a_400_naming_the_field() -> None:
    with pytest.raises(BadRequest) as caught:
        parse_feedback(b'{"request_id": "r1", "label": "ok \\udfff"}')
    assert caught.value.param == "label" and caught.value.code == "invalid_unicode"
    assert parse_feedback(b'{"request_id": "r1", "label": "ok \\ud83d\\ude00"}').label == "ok 😀"
