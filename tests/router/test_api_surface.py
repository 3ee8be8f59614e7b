"""``/v1/responses``, ``/v1/messages`` and ``/v1/embeddings`` on a real gateway, driven by the
official ``openai`` and ``anthropic`` SDKs and ``langchain-openai``, with fake upstreams on real
loopback ports (tests/servers.py): routing headers, events, auth, fallbacks, the bodies the
upstreams received (untouched, or translated for /v1/messages on an OpenAI backend)."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_openai import ChatOpenAI

from router.anthropic import StreamTranslator
from router.wire import SSE_DONE
from tests.router.conftest import REFERENCE
from tests.servers import FakeUpstream, ServerThread, wait_for

Upstreams = dict[str, tuple[FakeUpstream, ServerThread]]
KEY = "sk-surface-test"
TOOL = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


class Gateway:
    """A running gateway, its fakes and its event log."""

    def __init__(self, server: ServerThread, upstreams: Upstreams, events: Path) -> None:
        self.url = server.url
        self.server = server
        self.fakes = {name: fake for name, (fake, _server) in upstreams.items()}
        self.events = events

    def openai(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=20)

    def anthropic(self, key: str = KEY) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.url, api_key=key, max_retries=0, timeout=20)

    def last(self, backend: str) -> dict[str, Any]:
        """The last request the fake behind ``backend`` received."""
        fake = self.fakes["large2" if backend == "claude" else backend]
        return fake.requests[-1]

    def rows(self) -> list[dict[str, Any]]:
        """The event log's requests (the gateway is stopped first, so the log is drained)."""
        self.server.stop()
        with sqlite3.connect(self.events) as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM requests ORDER BY time")]


@pytest.fixture
def gateway(
    tiny_model_dir: Path,
    tiny_calibration: Path,
    upstreams: Upstreams,
    serve_yaml: Callable[[str], ServerThread],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Gateway]:
    monkeypatch.setenv("SURFACE_CLAUDE_KEY", "upstream-anthropic-key")
    url = {name: server.url + "/v1" for name, (_fake, server) in upstreams.items()}
    events = tmp_path / "events.sqlite"
    text = f"""
server: {{max_body_bytes: 65536}}
auth: {{api_keys: ["{KEY}"]}}
probe:
  model: "{tiny_model_dir}"
  layers: [1, 2, -1]
  token_mean: true
  timeout_s: 10
calibration: {{path: "{tiny_calibration}"}}
backends:
  small:
    type: openai
    base_urls: ["{url["small"]}"]
    model: small-served
    models: [small-direct, embed-small]
  large:
    type: openai
    base_urls: ["{url["large"]}"]
    model: large-served
    models: [large-direct]
    fallback: [small]
    retries: 0
  claude:
    type: openai
    api: anthropic
    api_key_env: SURFACE_CLAUDE_KEY
    base_urls: ["{url["large2"]}"]
    models: [claude-direct]
  tiny: {{type: local, max_new_tokens: 4}}
virtual_models:
  auto: {{policy: default}}
  claude-auto: {{policy: claude}}
policies:
  default:
    rules:
      - {{name: sparse, when: {{share: 0.5}}, route: large}}
    default: small
    on_probe_error: large
  claude:
    rules:
      - {{name: sparse, when: {{share: 0.5}}, route: claude}}
    default: claude
    on_probe_error: claude
events: {{sink: sqlite, path: "{events}"}}
"""
    yield Gateway(serve_yaml(text), upstreams, events)


def _chat_score(gw: Gateway, messages: list[dict[str, Any]]) -> str:
    """The probe score of the same text sent as chat (what /v1/route reads)."""
    body = {"model": "auto", "messages": messages}
    route = httpx.post(
        gw.url + "/v1/route",
        json=body,
        headers={"authorization": f"Bearer {KEY}"},
        timeout=20,
    )
    assert route.status_code == 200, route.text
    return f"{route.json()['probe']['result']['score']:.6f}"


def _check_routing(headers: Mapping[str, str]) -> str:
    backend = headers["x-router-backend"]
    percentile = float(headers["x-router-percentile"])
    assert backend == ("large" if percentile >= 0.5 else "small")
    assert headers["x-router-rule"] == ("sparse" if backend == "large" else "default")
    assert headers["x-router-request-id"]
    return backend


# -- /v1/responses ---------------------------------------------------------------------------


def test_responses_plain_is_probed_routed_and_forwarded_untouched(gateway: Gateway) -> None:
    c = gateway.openai()
    seen = set()
    for prompt in REFERENCE[:12]:
        raw = c.responses.with_raw_response.create(
            model="auto", instructions="Answer briefly.", input=prompt, temperature=0.5
        )
        backend = _check_routing(raw.headers)
        seen.add(backend)
        response = raw.parse()
        assert response.output_text == f"answer from {backend}"
        assert response.usage is not None and response.usage.output_tokens == 4
        got = gateway.last(backend)
        assert got["path"] == "/v1/responses"
        assert got["body"] == {
            "model": f"{backend}-served",  # the backend's model, like chat
            "instructions": "Answer briefly.",
            "input": prompt,
            "temperature": 0.5,
        }
        # the probe read instructions + input as a system and a user message
        chat = [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": prompt},
        ]
        assert raw.headers["x-router-score"] == _chat_score(gateway, chat)
    assert seen == {"small", "large"}


def test_responses_items_are_read_as_messages(gateway: Gateway) -> None:
    items: list[Any] = [
        {"role": "user", "content": [{"type": "input_text", "text": REFERENCE[3]}]},
        {"type": "function_call_output", "call_id": "c1", "output": "ignored by the probe"},
    ]
    raw = gateway.openai().responses.with_raw_response.create(model="auto", input=items)
    backend = _check_routing(raw.headers)
    assert gateway.last(backend)["body"]["input"] == items
    chat = [{"role": "user", "content": REFERENCE[3]}]
    assert raw.headers["x-router-score"] == _chat_score(gateway, chat)


def test_responses_stream_passes_the_events_through(gateway: Gateway) -> None:
    raw = gateway.openai().responses.with_raw_response.create(
        model="auto", input=REFERENCE[7], stream=True
    )
    backend = _check_routing(raw.headers)
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = list(raw.parse())
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == f"answer from {backend}"
    assert gateway.last(backend)["body"]["stream"] is True


def test_responses_fall_back_like_chat(gateway: Gateway) -> None:
    gateway.fakes["large"].mode = "error500"
    raw = gateway.openai().responses.with_raw_response.create(model="large-direct", input="hi")
    assert raw.headers["x-router-backend"] == "small"
    assert raw.headers["x-router-fallback"] == "large"
    assert raw.headers["x-router-rule"] == "direct"
    assert raw.parse().output_text == "answer from small"
    assert gateway.fakes["large"].requests[-1]["path"] == "/v1/responses"


def test_responses_bad_input_is_a_400_naming_the_field(gateway: Gateway) -> None:
    c = gateway.openai()
    with pytest.raises(openai.BadRequestError) as exc:
        c.responses.create(model="auto", input=42)  # type: ignore[call-overload]
    assert exc.value.body["param"] == "input"  # type: ignore[index]
    with pytest.raises(openai.AuthenticationError):
        gateway.openai("wrong").responses.create(model="auto", input="hi")


def test_local_backend_refuses_responses_naming_the_endpoint(gateway: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        gateway.openai().responses.create(model="tiny", input="hi")
    assert "route /v1/responses to an openai backend" in exc.value.message
    assert exc.value.code == "unsupported_endpoint"


# -- /v1/embeddings --------------------------------------------------------------------------


def test_embeddings_go_by_model_name_without_probe(gateway: Gateway) -> None:
    raw = gateway.openai().embeddings.with_raw_response.create(
        model="embed-small", input=["a", "bb"]
    )
    h = raw.headers
    assert h["x-router-backend"] == "small" and h["x-router-rule"] == "direct"
    assert "x-router-score" not in h and h["x-router-cache"] == "off"
    vectors = [d.embedding for d in raw.parse().data]
    assert vectors == [[1.0, 0.0, 0.5], [2.0, 1.0, 0.5]]  # the SDK's base64, decoded
    got = gateway.last("small")
    assert got["path"] == "/v1/embeddings"
    assert got["body"] == {
        "model": "embed-small",
        "input": ["a", "bb"],
        "encoding_format": "base64",
    }
    # a virtual model is no embedding model
    with pytest.raises(openai.NotFoundError):
        gateway.openai().embeddings.create(model="auto", input="a")
    missing = httpx.post(
        gateway.url + "/v1/embeddings",
        json={"model": "embed-small"},
        headers={"authorization": f"Bearer {KEY}"},
        timeout=20,
    )
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "input"


# -- /v1/messages on an OpenAI backend (translated) -------------------------------------------


def test_messages_translated_to_chat_and_back(gateway: Gateway) -> None:
    client = gateway.anthropic()
    raw = client.messages.with_raw_response.create(
        model="auto",
        system="Be brief.",
        messages=[{"role": "user", "content": [{"type": "text", "text": REFERENCE[9]}]}],
        max_tokens=64,
        stop_sequences=["END"],
        extra_body={"temperature": 0.2, "top_k": 5},  # not in this SDK's signature
    )
    backend = _check_routing(raw.headers)
    message = raw.parse()
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text"
    assert message.content[0].text == f"answer from {backend}"
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == 5 and message.usage.output_tokens == 4
    got = gateway.last(backend)
    assert got["path"] == "/v1/chat/completions"
    assert got["body"] == {  # top_k has no chat equivalent: dropped
        "model": f"{backend}-served",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": REFERENCE[9]},
        ],
        "max_tokens": 64,
        "temperature": 0.2,
        "stop": ["END"],
    }
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": REFERENCE[9]}]
    assert raw.headers["x-router-score"] == _chat_score(gateway, chat)


def test_messages_tools_translate_both_ways(gateway: Gateway) -> None:
    for name in ("small", "large"):
        gateway.fakes[name].mode = "tools"
    raw = gateway.anthropic().messages.with_raw_response.create(  # type: ignore[call-overload]
        model="auto",
        max_tokens=64,
        tools=[TOOL],
        tool_choice={"type": "any"},
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t0", "name": "get_weather", "input": {}}],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "t0", "content": "unknown"}],
            },
            {"role": "user", "content": "Try again."},
        ],
    )
    message = raw.parse()
    assert message.stop_reason == "tool_use"
    [call] = [b for b in message.content if b.type == "tool_use"]
    assert call.name == "get_weather" and call.input == {"city": "Paris"}
    body = gateway.last(raw.headers["x-router-backend"])["body"]
    assert body["tool_choice"] == "required"
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city",
                "parameters": TOOL["input_schema"],
            },
        }
    ]
    function = body["messages"][1]["tool_calls"][0]["function"]
    assert function == {"name": "get_weather", "arguments": "{}"}
    assert body["messages"][2] == {"role": "tool", "tool_call_id": "t0", "content": "unknown"}


def test_messages_stream_translated(gateway: Gateway) -> None:
    client = gateway.anthropic()
    with client.messages.stream(
        model="auto",
        max_tokens=32,
        system="Be brief.",
        messages=[{"role": "user", "content": REFERENCE[2]}],
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "tok0 tok1 tok2 "
    assert final.stop_reason == "end_turn" and final.content[0].type == "text"
    # tools, streamed: the call's arguments arrive as input_json_delta pieces
    for name in ("small", "large"):
        gateway.fakes[name].mode = "tools"
    with client.messages.stream(
        model="auto",
        max_tokens=32,
        tools=[TOOL],  # type: ignore[list-item]
        messages=[{"role": "user", "content": "Weather in Paris?"}],
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    [call] = [b for b in final.content if b.type == "tool_use"]
    assert call.name == "get_weather" and call.input == {"city": "Paris"}
    assert final.usage.output_tokens == 4


def test_messages_errors_have_anthropics_shape(gateway: Gateway) -> None:
    with pytest.raises(anthropic.AuthenticationError) as auth:
        gateway.anthropic("wrong").messages.create(
            model="auto", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
    assert auth.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as bad:
        gateway.anthropic().messages.create(model="auto", max_tokens=8, messages=[])
    assert bad.value.body["type"] == "error"  # type: ignore[index]
    assert "messages" in bad.value.body["error"]["message"]  # type: ignore[index]
    for name in ("small", "large"):
        gateway.fakes[name].mode = "error400"
    with pytest.raises(anthropic.BadRequestError) as upstream:
        gateway.anthropic().messages.create(
            model="auto", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
    assert upstream.value.body["error"]["message"] == "bad field"  # type: ignore[index]


def test_messages_stream_broken_midway_ends_with_an_anthropic_error_event(
    gateway: Gateway,
) -> None:
    for name in ("small", "large"):
        gateway.fakes[name].mode = "cut"  # two chunks, then the connection drops
    raw = httpx.post(
        gateway.url + "/v1/messages",
        json={
            "model": "auto",
            "max_tokens": 8,
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        },
        headers={"x-api-key": KEY},
        timeout=20,
    )
    assert raw.status_code == 200
    assert "event: content_block_delta" in raw.text
    last = raw.text.strip().split("\n\n")[-1]
    assert last.startswith("event: error\ndata: ")
    error = json.loads(last.split("data: ", 1)[1])
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    assert "[DONE]" not in raw.text
    with (
        pytest.raises(anthropic.APIStatusError),
        gateway.anthropic().messages.stream(
            model="auto", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        ) as stream,
    ):
        "".join(stream.text_stream)


# -- /v1/messages on an Anthropic backend (untouched) -----------------------------------------


def test_messages_forwarded_untouched_to_an_anthropic_backend(gateway: Gateway) -> None:
    client = gateway.anthropic()
    request: dict[str, Any] = {
        "model": "claude-auto",
        "max_tokens": 16,
        "system": [{"type": "text", "text": "Be brief."}],
        "messages": [{"role": "user", "content": REFERENCE[4]}],
        "tools": [TOOL],
    }
    extra = {"top_k": 3}
    raw = client.messages.with_raw_response.create(**request, extra_body=extra)
    assert raw.headers["x-router-backend"] == "claude"
    assert raw.headers["x-router-rule"] in ("sparse", "default")
    assert float(raw.headers["x-router-score"]) > 0
    assert raw.parse().content[0].text == "answer from large2"
    got = gateway.last("claude")
    assert got["path"] == "/v1/messages" and got["body"] == {**request, **extra}
    assert got["headers"]["x-api-key"] == "upstream-anthropic-key"
    assert got["headers"]["anthropic-version"] == "2023-06-01"
    assert "authorization" not in got["headers"]
    with client.messages.stream(**request) as stream:
        text = "".join(stream.text_stream)
    assert text == "answer from large2"
    assert gateway.last("claude")["body"] == {**request, "stream": True}
    # an Anthropic backend answers nothing else
    with pytest.raises(openai.BadRequestError) as exc:
        gateway.openai().responses.create(model="claude-direct", input="hi")
    assert "answers /v1/messages only" in exc.value.message


# -- events, langchain -----------------------------------------------------------------------


def test_events_record_each_endpoint(gateway: Gateway) -> None:
    c = gateway.openai()
    r = c.responses.with_raw_response.create(model="auto", input=REFERENCE[1])
    e = c.embeddings.with_raw_response.create(model="embed-small", input="a")
    m = gateway.anthropic().messages.with_raw_response.create(
        model="claude-direct", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
    )
    ids = {
        r.headers["x-router-request-id"]: ("responses", r.headers["x-router-backend"]),
        e.headers["x-router-request-id"]: ("embeddings", "small"),
        m.headers["x-router-request-id"]: ("messages", "claude"),
    }
    assert wait_for(lambda: sum(f.completed for f in gateway.fakes.values()) >= 3)
    rows = {row["request_id"]: row for row in gateway.rows()}
    for request_id, (endpoint, backend) in ids.items():
        row = rows[request_id]
        assert (row["endpoint"], row["backend"], row["status"]) == (endpoint, backend, 200)
    assert rows[e.headers["x-router-request-id"]]["score"] is None  # never probed


def test_langchain_chat_openai_invoke_and_stream(gateway: Gateway) -> None:
    llm = ChatOpenAI(
        base_url=gateway.url + "/v1", api_key=KEY, model="small-direct", max_retries=0, timeout=20
    )
    assert llm.invoke("hello").content == "answer from small"
    chunks = [c.content for c in llm.stream("hello")]
    assert "".join(str(c) for c in chunks) == "tok0 tok1 tok2 "
    assert gateway.last("small")["path"] == "/v1/chat/completions"
    assert json.loads(json.dumps(gateway.last("small")["body"]))["stream"] is True


# -- the translator alone, and hostile bodies ---------------------------------------------------


def _chat_stream(*chunks: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + SSE_DONE


def test_stream_translator_is_the_same_however_the_bytes_are_cut() -> None:
    raw = _chat_stream(
        {"model": "m", "choices": [{"delta": {"role": "assistant", "content": "Hé"}}]},
        {"choices": [{"delta": {"content": " là"}}]},
        {
            "choices": [
                {"delta": {"tool_calls": [{"index": 0, "id": "c", "function": {"name": "f"}}]}}
            ]
        },
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}}]},
        {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 7}},
    )
    whole = StreamTranslator("m").feed(raw)
    one = StreamTranslator("m")
    bytewise = b"".join(one.feed(raw[i : i + 1]) for i in range(len(raw))) + one.finish()
    same_ids = re.compile(rb"msg_[0-9a-f]+")
    assert same_ids.sub(b"msg_", whole) == same_ids.sub(b"msg_", bytewise)
    events = [json.loads(line[6:]) for line in whole.split(b"\n") if line.startswith(b"data: ")]
    assert [e["type"] for e in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[5]["content_block"] == {"type": "tool_use", "id": "c", "name": "f", "input": {}}
    assert events[8]["delta"]["stop_reason"] == "tool_use"
    assert events[8]["usage"]["output_tokens"] == 7


_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
_blocks = st.lists(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image", "tool_use", "tool_result", "x"])},
        optional={"text": _values, "content": _values, "source": _values, "input": _values},
    ),
    max_size=3,
)
_hostile = st.one_of(
    st.builds(
        lambda system, messages, tools, choice, stream: {
            "path": "/v1/messages",
            "model": "auto",
            "system": system,
            "messages": messages,
            "tools": tools,
            "tool_choice": choice,
            "stream": stream,
            "max_tokens": 8,
        },
        _values | _blocks,
        st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "assistant", "x"]), "content": _values | _blocks}
            ),
            max_size=3,
        )
        | _values,
        _values,
        _values,
        st.booleans(),
    ),
    st.builds(
        lambda instructions, items, stream: {
            "path": "/v1/responses",
            "model": "auto",
            "instructions": instructions,
            "input": items,
            "stream": stream,
        },
        _values,
        _values | st.lists(st.fixed_dictionaries({"role": _values, "content": _values | _blocks})),
        st.booleans(),
    ),
    st.builds(
        lambda model, data: {"path": "/v1/embeddings", "model": model, "input": data},
        st.sampled_from(["embed-small", "auto", "claude-direct", "tiny"]),
        _values,
    ),
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(case=_hostile)
def test_hostile_bodies_get_a_4xx_or_an_answer(gateway: Gateway, case: dict[str, Any]) -> None:
    body = dict(case)
    path = body.pop("path")
    r = httpx.post(
        gateway.url + path, json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=20
    )
    assert r.status_code < 500, (path, body, r.status_code, r.text[:300])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert {"message", "type"} <= set(error)
        assert (r.json().get("type") == "error") == (path == "/v1/messages")
