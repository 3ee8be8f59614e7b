"""Capability-aware routing through a real gateway, driven by the official openai SDK and
langchain-openai: rules on the request's shape (has_tools, has_images, response_format,
n_messages), backends' ``capabilities``, tool calls through plain answers, streams and cascades,
and the 400 when no backend can serve what the request needs."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from policies.loader import parse_settings
from probes.probe import SparsityProbe
from router.app import create_app
from router.backends.base import Endpoint
from router.requests import ParsedRequest, parse_request
from tests.router.conftest import LONG_ANSWER, SHORT_ANSWER, fit_answer_calibration
from tests.servers import FakeUpstream, ServerThread

Upstreams = dict[str, tuple[FakeUpstream, ServerThread]]

#: small: JSON only, falls back to large; large: everything (the default); large2 (``bare``):
#: nothing, served directly as ``bare-direct`` and as the ``plain`` model's only backend.
CONFIG = """
server: {{max_body_bytes: 65536, passthrough_direct_models: true}}
probe: {{model: "{model}", layers: [1], timeout_s: 10}}
backends:
  small:
    type: openai
    base_urls: ["{small}"]
    model: small-served
    capabilities: [json]
    fallback: [large]
  large: {{type: openai, base_urls: ["{large}"], model: large-served}}
  bare:
    type: openai
    base_urls: ["{bare}"]
    model: bare-served
    capabilities: []
    models: [bare-direct]
virtual_models:
  auto: {{policy: default}}
  plain: {{policy: plain}}
policies:
  default:
    rules:
      - {{name: pictures, when: {{has_images: true}}, route: large}}
      - {{name: schema, when: {{response_format: json_schema}}, route: small}}
      - {{name: long, when: {{n_messages: {{min: 4}}}}, route: large}}
    default: small
    on_probe_error: small
  plain:
    default: bare
    on_probe_error: bare
"""

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
HI = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture
def gateway(
    tiny_model_dir: Path,
    upstreams: Upstreams,
    serve_yaml: Callable[[str], ServerThread],
) -> ServerThread:
    for fake, _server in upstreams.values():
        fake.mode = "tools"  # a request offering tools is answered with a tool call
    url = {name: server.url + "/v1" for name, (_fake, server) in upstreams.items()}
    text = CONFIG.format(
        model=tiny_model_dir, small=url["small"], large=url["large"], bare=url["large2"]
    )
    return serve_yaml(text)


def client(gw: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0, timeout=20)


def bodies(upstreams: Upstreams, name: str) -> list[dict[str, Any]]:
    return [r["body"] for r in upstreams[name][0].requests]


def test_tools_go_past_a_backend_without_them(gateway: ServerThread, upstreams: Upstreams) -> None:
    raw = client(gateway).chat.completions.with_raw_response.create(
        model="auto", messages=HI, tools=[WEATHER], tool_choice="auto"
    )
    assert raw.headers["x-router-backend"] == "large"
    assert raw.headers["x-router-rule"] == "default"  # the policy chose small, which lacks tools
    assert raw.headers["x-router-capability-fallback"] == "small:tools"
    message = raw.parse().choices[0].message
    assert raw.parse().choices[0].finish_reason == "tool_calls"
    assert message.tool_calls is not None and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert (call.id, call.function.name) == ("call_1", "get_weather")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert bodies(upstreams, "small") == []  # never asked: it would have dropped the tools
    sent = bodies(upstreams, "large")[-1]
    assert sent["tools"] == [WEATHER] and sent["tool_choice"] == "auto"  # untouched
    assert sent["model"] == "large-served"

    # the tool's result goes back the same way, and the answer is text again
    follow = client(gateway).chat.completions.with_raw_response.create(
        model="auto",
        messages=[
            *HI,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
        ],
        tools=[WEATHER],
    )
    assert follow.headers["x-router-backend"] == "large"
    assert follow.parse().choices[0].message.content == "answer from large"
    history = bodies(upstreams, "large")[-1]["messages"]
    assert history[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert history[2] == {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'}

    # without tools, small answers as the policy said, with no capability header
    plain = client(gateway).chat.completions.with_raw_response.create(model="auto", messages=HI)
    assert plain.headers["x-router-backend"] == "small"
    assert "x-router-capability-fallback" not in plain.headers
    metrics = httpx.get(gateway.url + "/metrics", timeout=10).text
    assert (
        "sparsity_router_capability_fallbacks_total"
        '{answered="large",backend="small",capability="tools"} 2.0' in metrics
    )


def test_a_tool_call_streams_through(gateway: ServerThread, upstreams: Upstreams) -> None:
    stream = client(gateway).chat.completions.create(
        model="auto",
        messages=HI,
        tools=[WEATHER],
        stream=True,
        stream_options={"include_usage": True},
    )
    names, arguments, finish = [], "", None
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or ():
                if delta.function is not None and delta.function.name:
                    names.append(delta.function.name)
                if delta.function is not None and delta.function.arguments:
                    arguments += delta.function.arguments
            finish = choice.finish_reason or finish
    assert names == ["get_weather"] and json.loads(arguments) == {"city": "Paris"}
    assert finish == "tool_calls"
    assert bodies(upstreams, "small") == []
    sent = bodies(upstreams, "large")[-1]
    assert sent["stream"] is True and sent["tools"] == [WEATHER]


def test_langchain_bind_tools_gets_the_call_back(
    gateway: ServerThread, upstreams: Upstreams
) -> None:
    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    llm = ChatOpenAI(
        model="auto", base_url=gateway.url + "/v1", api_key="none", max_retries=0, timeout=20
    )
    answer = llm.bind_tools([get_weather]).invoke("What is the weather in Paris?")
    assert answer.tool_calls == [
        {"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1", "type": "tool_call"}
    ]
    sent = bodies(upstreams, "large")[-1]
    assert [t["function"]["name"] for t in sent["tools"]] == ["get_weather"]
    assert bodies(upstreams, "small") == []


def test_shape_rules_route_as_configured(gateway: ServerThread, upstreams: Upstreams) -> None:
    c = client(gateway)
    image = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            ],
        }
    ]
    raw = c.chat.completions.with_raw_response.create(model="auto", messages=image)  # type: ignore[arg-type]
    assert (raw.headers["x-router-rule"], raw.headers["x-router-backend"]) == ("pictures", "large")
    assert bodies(upstreams, "large")[-1]["messages"] == image

    schema = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": {"type": "object"}},
    }
    raw = c.chat.completions.with_raw_response.create(
        model="auto",
        messages=HI,
        response_format=schema,  # type: ignore[arg-type]
    )
    assert (raw.headers["x-router-rule"], raw.headers["x-router-backend"]) == ("schema", "small")
    assert bodies(upstreams, "small")[-1]["response_format"] == schema

    raw = c.chat.completions.with_raw_response.create(
        model="auto", messages=HI, response_format={"type": "json_object"}
    )
    assert (raw.headers["x-router-rule"], raw.headers["x-router-backend"]) == ("default", "small")
    assert "x-router-capability-fallback" not in raw.headers  # small has json

    turns = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(5)
    ]
    raw = c.chat.completions.with_raw_response.create(model="auto", messages=turns)  # type: ignore[arg-type]
    assert (raw.headers["x-router-rule"], raw.headers["x-router-backend"]) == ("long", "large")
    raw = c.chat.completions.with_raw_response.create(model="auto", messages=turns[:3])  # type: ignore[arg-type]
    assert (raw.headers["x-router-rule"], raw.headers["x-router-backend"]) == ("default", "small")

    # the dry run says the same, without asking anyone
    n = len(upstreams["small"][0].requests) + len(upstreams["large"][0].requests)
    body = {"model": "auto", "messages": HI, "tools": [WEATHER]}
    decision = httpx.post(gateway.url + "/v1/route", json=body, timeout=20).json()["decision"]
    assert decision["backend"] == "large" and decision["capability_fallback"] == "small:tools"
    assert decision["fallbacks"] == [] and "small lacks tools" in decision["reason"]
    assert len(upstreams["small"][0].requests) + len(upstreams["large"][0].requests) == n


@pytest.mark.parametrize(
    ("model", "extra", "capability", "param"),
    [
        ("plain", {"tools": [WEATHER]}, "tools", "tools"),
        ("plain", {"response_format": {"type": "json_object"}}, "json", "response_format"),
        ("bare-direct", {"tools": [WEATHER]}, "tools", "tools"),
        (
            "plain",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "and this?"},
                            {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                        ],
                    }
                ]
            },
            "vision",
            "messages[0].content[1]",
        ),
    ],
)
def test_no_backend_with_the_capability_is_a_400(
    gateway: ServerThread,
    upstreams: Upstreams,
    model: str,
    extra: dict[str, Any],
    capability: str,
    param: str,
) -> None:
    body = {"model": model, "messages": HI, **extra}
    with pytest.raises(openai.BadRequestError) as info:
        client(gateway).chat.completions.create(**body)
    error = info.value.body
    assert isinstance(error, dict)
    assert info.value.status_code == 400
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["code"] == "unsupported_capability"
    assert capability in error["message"] and "bare" in error["message"]
    assert bodies(upstreams, "large2") == []  # never sent on without what it needed
    # without the field the same model answers
    assert client(gateway).chat.completions.create(model=model, messages=HI).choices


def test_malformed_shape_fields_are_422(gateway: ServerThread) -> None:
    for extra, param in (
        ({"tools": {"type": "function"}}, "tools"),
        ({"response_format": "json"}, "response_format"),
        ({"response_format": {"json_schema": {}}}, "response_format.type"),
    ):
        body = {"model": "auto", "messages": HI, **extra}
        r = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=20)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["param"] == param


# -- cascades --------------------------------------------------------------------------------

SHORT, LONG = SHORT_ANSWER, LONG_ANSWER

CASCADE = """
probe: {{model: "{model}", layers: [1], timeout_s: 10}}
calibration: {{answer_path: "{answer}"}}
backends:
  small: {{type: openai, base_urls: ["{small}"], model: small-served}}
  large: {{type: openai, base_urls: ["{large}"], model: large-served, capabilities: [tools]}}
policies:
  default:
    default: small
    on_probe_error: small
    cascade: {{backend: small, escalate_to: large, when: {{p_large: {{min: 0.5}}}}}}
"""


@pytest.fixture(scope="module")
def answer_calibration(tiny_probe: SparsityProbe, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LONG answer escalates, a SHORT one is kept (as in test_cascade_gateway.py)."""
    path = tmp_path_factory.mktemp("answers") / "answers.json"
    fit_answer_calibration(tiny_probe, path)
    return path


@dataclass
class Cascaded:
    url: str
    small: FakeUpstream
    large: FakeUpstream


@pytest.fixture
def cascaded(
    tiny_probe: SparsityProbe, tmp_path: Path, answer_calibration: Path
) -> Iterator[Cascaded]:
    small = FakeUpstream(name="small", mode="tools", reply=lambda body: LONG)
    large = FakeUpstream(name="large", mode="tools")
    servers = [ServerThread(small).start(), ServerThread(large).start()]
    try:
        text = CASCADE.format(
            model=tiny_probe.settings.model,
            answer=answer_calibration,
            small=servers[0].url + "/v1",
            large=servers[1].url + "/v1",
        )
        settings = parse_settings(text, source_name="gateway.yaml", base_dir=tmp_path)
        served = SparsityProbe(settings.probe.probe_settings(), loaded=tiny_probe.loaded)
        gateway = ServerThread(create_app(settings, probe=served)).start()
        try:
            yield Cascaded(gateway.url, small, large)
        finally:
            gateway.stop()
    finally:
        for server in servers:
            server.stop()


def test_a_cascade_returns_tool_calls_unchecked(cascaded: Cascaded) -> None:
    c = openai.OpenAI(base_url=cascaded.url + "/v1", api_key="none", max_retries=0, timeout=30)
    raw = c.chat.completions.with_raw_response.create(model="auto", messages=HI, tools=[WEATHER])
    assert raw.headers["x-router-cascade"] == "skipped"  # tool calls: nothing for the probe
    assert raw.headers["x-router-backend"] == "small"
    call = raw.parse().choices[0].message.tool_calls
    assert call is not None and call[0].function.name == "get_weather"
    assert cascaded.small.requests[-1]["body"]["tools"] == [WEATHER]
    assert cascaded.large.requests == []

    # streamed: the skipped answer is replayed as a stream, its tool call whole
    stream = c.chat.completions.create(model="auto", messages=HI, tools=[WEATHER], stream=True)
    calls = [d for chunk in stream for ch in chunk.choices for d in ch.delta.tool_calls or ()]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].id == "call_1"
    assert calls[0].function is not None and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments or "") == {"city": "Paris"}
    assert cascaded.small.requests[-1]["body"]["stream"] is False
    assert cascaded.large.requests == []


def test_a_cascade_escalates_only_to_a_capable_backend(cascaded: Cascaded) -> None:
    c = openai.OpenAI(base_url=cascaded.url + "/v1", api_key="none", max_retries=0, timeout=30)
    # a text answer that rambles escalates to large, which has tools ...
    tools_body: dict[str, Any] = {"tools": [WEATHER], "tool_choice": "none"}
    cascaded.small.mode = "ok"  # answers with text even though tools are offered
    raw = c.chat.completions.with_raw_response.create(model="auto", messages=HI, **tools_body)
    assert raw.headers["x-router-cascade"] == "escalated"
    assert cascaded.large.requests[-1]["body"]["tools"] == [WEATHER]
    # ... but not a request needing JSON, which large lacks: the checked answer is returned
    n = len(cascaded.large.requests)
    raw = c.chat.completions.with_raw_response.create(
        model="auto", messages=HI, response_format={"type": "json_object"}
    )
    assert raw.headers["x-router-cascade"] == "escalation_failed"
    assert raw.headers["x-router-backend"] == "small"
    assert raw.parse().choices[0].message.content == LONG
    assert len(cascaded.large.requests) == n


# -- the request's shape, read once at parse -------------------------------------------------


def parsed(body: dict[str, Any], endpoint: Endpoint = "chat/completions") -> ParsedRequest:
    return parse_request(endpoint, json.dumps({"model": "auto", **body}).encode())


def test_the_shape_is_read_at_parse() -> None:
    plain = parsed({"messages": HI})
    assert (plain.has_tools, plain.has_images, plain.response_format) == (False, False, "text")
    assert plain.n_messages == 1 and dict(plain.needs) == {}
    legacy = parsed({"messages": HI, "tools": [], "functions": [{"name": "f"}]})
    assert legacy.has_tools and dict(legacy.needs) == {"tools": "functions"}  # empty tools: none
    picture = {"type": "input_image", "image_url": "https://x/y.png"}
    images = parsed(
        {
            "messages": [
                *HI,
                {"role": "user", "content": [{"type": "text", "text": "and"}, picture]},
            ],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x"}},
        }
    )
    assert images.has_images and images.response_format == "json_schema"
    assert dict(images.needs) == {"vision": "messages[1].content[1]", "json": "response_format"}
    assert images.n_messages == 2
    text = parsed({"messages": HI, "response_format": {"type": "text"}})
    assert dict(text.needs) == {}
    prompt = parsed(
        {"prompt": "2 + 2 =", "response_format": {"type": "json_object"}}, "completions"
    )
    assert prompt.n_messages == 0 and dict(prompt.needs) == {"json": "response_format"}


def test_the_shape_of_responses_and_messages_bodies() -> None:
    tools = [{"type": "function", "name": "f", "parameters": {}}]
    schema = {"format": {"type": "json_schema", "name": "x", "schema": {}}}
    responses = parsed({"input": "hi", "tools": tools, "text": schema}, "responses")
    assert (responses.has_tools, responses.response_format, responses.n_messages) == (
        True,
        "json_schema",
        1,
    )
    assert dict(responses.needs) == {"tools": "tools", "json": "text.format"}
    picture = {"type": "input_image", "image_url": "https://x/y.png"}
    items = [{"role": "user", "content": [{"type": "input_text", "text": "hi"}, picture]}]
    assert dict(parsed({"input": items}, "responses").needs) == {"vision": "input[0].content[1]"}
    image = {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}
    anthropic = {"max_tokens": 5, "messages": [{"role": "user", "content": [image]}]}
    assert dict(parsed(anthropic, "messages").needs) == {"vision": "messages[0].content[0]"}
    assert dict(parsed({"input": "hi"}, "embeddings").needs) == {}
