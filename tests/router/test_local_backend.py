"""LocalBackend: in-process generation with the tiny random Llama (and once with SmolLM2)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import threading
import time
import warnings
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any, cast

import anyio
import pytest
import torch

from probes.model import LoadedModel, load_model
from router.backends.base import UpstreamResult
from router.backends.local import LocalBackend
from router.errors import UpstreamError, UpstreamStatus

pytestmark = pytest.mark.anyio

CHAT = {"messages": [{"role": "user", "content": "What is two plus two?"}]}
LONG = {**CHAT, "ignore_eos": True, "max_tokens": 4000, "temperature": 0}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> LoadedModel:
    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture
async def backend(tiny: LoadedModel) -> AsyncGenerator[LocalBackend, None]:
    b = LocalBackend("small", tiny, model_name="tiny-local", max_new_tokens=64)
    yield b
    await b.aclose()


class Recorder:
    """Wraps a model: records which thread ran each forward pass; can fail on call N."""

    def __init__(self, model: Any, *, fail_on: int | None = None) -> None:
        self._model = model
        self._fail_on = fail_on
        self.calls: list[threading.Thread] = []  # thread objects: idents get reused

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(threading.current_thread())
        if self._fail_on is not None and len(self.calls) >= self._fail_on:
            raise RuntimeError("simulated device failure")
        return self._model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def recorded(tiny: LoadedModel, **kwargs: Any) -> tuple[LoadedModel, Recorder]:
    recorder = Recorder(tiny.model, **kwargs)
    return dataclasses.replace(tiny, model=recorder), recorder


def parse(result: UpstreamResult) -> dict[str, Any]:
    assert result.status == 200
    assert result.content_type == "application/json"
    assert result.body is not None
    data: dict[str, Any] = json.loads(result.body)
    return data


def events(raw: bytes) -> list[Any]:
    """Split SSE bytes into decoded JSON payloads ('[DONE]' kept as the string)."""
    out: list[Any] = []
    for block in raw.split(b"\n\n"):
        if not block:
            continue
        assert block.startswith(b"data: "), block
        data = block[len(b"data: ") :]
        out.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return out


async def read_stream(result: UpstreamResult) -> list[Any]:
    assert result.status == 200
    assert result.content_type == "text/event-stream"
    assert result.stream is not None
    raw = b"".join([chunk async for chunk in result.stream])
    await result.close()
    return events(raw)


def content_of(chunks: list[Any]) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or ""
        for c in chunks
        if isinstance(c, dict) and c["choices"]
    )


def prompt_len(tiny: LoadedModel, messages: list[dict[str, str]]) -> int:
    tok = tiny.tokenizer
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tok(text, add_special_tokens=False)["input_ids"])


def generation_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("local-generate-")]


async def wait_idle(backend: LocalBackend, within: float = 1.0) -> float:
    start = time.monotonic()
    while backend.running or generation_threads():
        if time.monotonic() - start > within:
            raise AssertionError(f"generation still running after {within} s")
        await anyio.sleep(0.01)
    return time.monotonic() - start


# -- basics ---------------------------------------------------------------------------------


async def test_protocol_bits(backend: LocalBackend, tiny: LoadedModel) -> None:
    assert backend.name == "small"
    assert backend.model_names() == ["tiny-local"]
    assert await backend.ping() == f"local model {tiny.spec} loaded"


async def test_chat_shape_and_usage(backend: LocalBackend, tiny: LoadedModel) -> None:
    data = parse(await backend.send("chat/completions", {**CHAT, "max_tokens": 5}, stream=False))
    assert data["id"].startswith("chatcmpl-")
    assert data["object"] == "chat.completion"
    assert isinstance(data["created"], int)
    assert data["model"] == "tiny-local"
    [choice] = data["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = data["usage"]
    assert usage["prompt_tokens"] == prompt_len(tiny, CHAT["messages"])
    assert 1 <= usage["completion_tokens"] <= 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_max_tokens_gives_length(backend: LocalBackend) -> None:
    for key in ("max_tokens", "max_completion_tokens"):
        body = {**CHAT, key: 7, "ignore_eos": True, "temperature": 0}
        data = parse(await backend.send("chat/completions", body, stream=False))
        assert data["choices"][0]["finish_reason"] == "length"
        assert data["usage"]["completion_tokens"] == 7


async def test_max_tokens_capped_by_backend(tiny: LoadedModel) -> None:
    b = LocalBackend("small", tiny, max_new_tokens=3)
    body = {**CHAT, "max_tokens": 1000, "ignore_eos": True}
    data = parse(await b.send("chat/completions", body, stream=False))
    assert data["usage"]["completion_tokens"] == 3
    assert data["choices"][0]["finish_reason"] == "length"
    await b.aclose()


async def test_greedy_is_deterministic(backend: LocalBackend) -> None:
    body = {**CHAT, "max_tokens": 12, "temperature": 0}
    first = parse(await backend.send("chat/completions", body, stream=False))
    second = parse(await backend.send("chat/completions", body, stream=False))
    assert first["choices"][0]["message"] == second["choices"][0]["message"]


async def test_seed_makes_sampling_reproducible(backend: LocalBackend) -> None:
    async def sample(seed: int) -> str:
        body = {**CHAT, "max_tokens": 24, "temperature": 1.0, "seed": seed, "ignore_eos": True}
        data = parse(await backend.send("chat/completions", body, stream=False))
        return str(data["choices"][0]["message"]["content"])

    a, b, c = await sample(1), await sample(1), await sample(2)
    assert a == b
    assert a != c
    # Seeded sampling leaves the global RNG alone.
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    await sample(3)
    assert torch.equal(torch.rand(1), before)


async def sampled_text(backend: LocalBackend, seed: int = 7) -> tuple[dict[str, Any], str]:
    body = {**CHAT, "max_tokens": 40, "temperature": 1.0, "seed": seed, "ignore_eos": True}
    data = parse(await backend.send("chat/completions", body, stream=False))
    text = str(data["choices"][0]["message"]["content"])
    assert len(text) >= 20, text
    return body, text


async def test_stop_string_cuts_text(backend: LocalBackend) -> None:
    body, text = await sampled_text(backend)
    mid = len(text) // 2
    stop = text[mid : mid + 3]
    expected = text[: text.find(stop)]
    for stops in (stop, ["never-appears-xyz", stop]):
        data = parse(await backend.send("chat/completions", {**body, "stop": stops}, stream=False))
        assert data["choices"][0]["message"]["content"] == expected
        assert data["choices"][0]["finish_reason"] == "stop"
        assert data["usage"]["completion_tokens"] < 40
    # Streamed, a stop string never leaks out, not even split across pieces.
    chunks = await read_stream(
        await backend.send("chat/completions", {**body, "stop": stop}, stream=True)
    )
    assert content_of(chunks) == expected
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


async def test_ignores_unknown_fields(backend: LocalBackend) -> None:
    body = {
        **CHAT,
        "max_tokens": 3,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "tool_choice": "auto",
        "response_format": {"type": "json_object"},
        "logprobs": True,
        "user": "u1",
        "n": 1,
        "stream_options": {"include_usage": True},  # meaningless without stream: ignored
    }
    data = parse(await backend.send("chat/completions", body, stream=False))
    assert data["choices"][0]["message"]["role"] == "assistant"
    # Content parts of type text are joined; assistant turns with null content are fine.
    body = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hello"}]},
            {"role": "assistant", "content": None, "tool_calls": []},
            {"role": "user", "content": "again"},
        ],
        "max_tokens": 2,
    }
    parse(await backend.send("chat/completions", body, stream=False))


async def test_completions_endpoint(backend: LocalBackend, tiny: LoadedModel) -> None:
    body = {"prompt": "The quick brown fox", "max_tokens": 6, "temperature": 0}
    data = parse(await backend.send("completions", body, stream=False))
    assert data["id"].startswith("cmpl-")
    assert data["object"] == "text_completion"
    assert data["model"] == "tiny-local"
    [choice] = data["choices"]
    assert isinstance(choice["text"], str)
    assert choice["finish_reason"] in ("stop", "length")
    assert data["usage"]["prompt_tokens"] == len(tiny.tokenizer("The quick brown fox")["input_ids"])
    listed = parse(
        await backend.send("completions", {**body, "prompt": ["The quick brown fox"]}, stream=False)
    )
    assert listed["choices"][0]["text"] == choice["text"]
    chunks = await read_stream(await backend.send("completions", body, stream=True))
    assert chunks[-1] == "[DONE]"
    assert all(c["object"] == "text_completion" for c in chunks[:-1])
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == choice["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == choice["finish_reason"]


# -- streaming ------------------------------------------------------------------------------


async def test_stream_matches_non_stream(backend: LocalBackend) -> None:
    for body in (
        {**CHAT, "max_tokens": 16, "temperature": 0},
        {**CHAT, "max_tokens": 24, "temperature": 0.8, "top_p": 0.9, "seed": 11},
    ):
        plain = parse(await backend.send("chat/completions", body, stream=False))
        chunks = await read_stream(await backend.send("chat/completions", body, stream=True))
        assert chunks[-1] == "[DONE]"
        payloads = chunks[:-1]
        assert len(payloads) >= 4
        assert len({c["id"] for c in payloads}) == 1
        assert payloads[0]["id"].startswith("chatcmpl-")
        assert all(c["object"] == "chat.completion.chunk" for c in payloads)
        assert all(c["model"] == "tiny-local" for c in payloads)
        assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert all("usage" not in c for c in payloads)
        assert [c["choices"][0]["finish_reason"] for c in payloads[:-1]] == [None] * (
            len(payloads) - 1
        )
        assert payloads[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
        assert payloads[-1]["choices"][0]["delta"] == {}
        assert content_of(payloads) == plain["choices"][0]["message"]["content"]


async def test_stream_include_usage(backend: LocalBackend, tiny: LoadedModel) -> None:
    body = {**CHAT, "max_tokens": 5, "ignore_eos": True, "stream_options": {"include_usage": True}}
    chunks = await read_stream(await backend.send("chat/completions", body, stream=True))
    assert chunks[-1] == "[DONE]"
    usage_chunk = chunks[-2]
    assert usage_chunk["choices"] == []
    n_prompt = prompt_len(tiny, CHAT["messages"])
    assert usage_chunk["usage"] == {
        "prompt_tokens": n_prompt,
        "completion_tokens": 5,
        "total_tokens": n_prompt + 5,
    }
    assert all(c["usage"] is None for c in chunks[:-2])
    assert chunks[-3]["choices"][0]["finish_reason"] == "length"


async def test_stream_really_streams(backend: LocalBackend) -> None:
    big = LocalBackend("big", backend.loaded, max_new_tokens=4000)
    result = await big.send("chat/completions", LONG, stream=True)
    assert result.stream is not None
    seen = 0
    async for _chunk in result.stream:
        seen += 1
        if seen == 3:
            break
    # Three chunks are out and the same generation is still going.
    assert big.running == 1
    await result.close()
    assert big.running == 0
    await big.aclose()


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patch", "param", "words"),
    [
        ({"n": 2}, "n", "n>1 is not supported by local backends"),
        ({"max_tokens": "abc"}, "max_tokens", "'max_tokens' must be an integer"),
        ({"max_tokens": 0}, "max_tokens", "at least 1"),
        ({"max_completion_tokens": 2.5}, "max_completion_tokens", "must be an integer"),
        ({"temperature": "hot"}, "temperature", "'temperature' must be a number"),
        ({"temperature": -1}, "temperature", ">= 0"),
        ({"top_p": 0}, "top_p", "'top_p'"),
        ({"seed": "x"}, "seed", "'seed' must be an integer"),
        ({"stop": 5}, "stop", "'stop' must be a string or a list of strings"),
        ({"stream_options": "yes"}, "stream_options", "'stream_options'"),
        ({"messages": "hi"}, "messages", "'messages' must be a non-empty list"),
        ({"messages": []}, "messages", "'messages' must be a non-empty list"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content",
            "text content only",
        ),
    ],
)
async def test_bad_requests_are_400(
    backend: LocalBackend, patch: dict[str, Any], param: str, words: str
) -> None:
    for stream in (False, True):
        with pytest.raises(UpstreamStatus) as info:
            await backend.send("chat/completions", {**CHAT, **patch}, stream=stream)
        exc = info.value
        assert exc.upstream_status == 400
        assert exc.content_type == "application/json"
        error = json.loads(exc.content)["error"]
        assert error["type"] == "invalid_request_error"
        assert error["param"] == param
        assert words in error["message"]
    assert backend.running == 0


async def test_bad_completion_prompts(backend: LocalBackend) -> None:
    for prompt in (None, 5, ["a", "b"], [{"x": 1}]):
        with pytest.raises(UpstreamStatus) as info:
            await backend.send("completions", {"prompt": prompt}, stream=False)
        assert json.loads(info.value.content)["error"]["param"] == "prompt"


async def test_context_length_exceeded(tiny: LoadedModel) -> None:
    b = LocalBackend("small", tiny)
    long_prompt = list(range(10, 20)) * 500  # 5000 token ids > 4096 positions
    with pytest.raises(UpstreamStatus) as info:
        await b.send("completions", {"prompt": long_prompt}, stream=False)
    assert json.loads(info.value.content)["error"]["code"] == "context_length_exceeded"


async def test_failure_before_output_is_upstream_error(tiny: LoadedModel) -> None:
    loaded, _ = recorded(tiny, fail_on=1)
    b = LocalBackend("small", loaded)
    for stream in (False, True):
        with pytest.raises(UpstreamError, match="simulated device failure") as info:
            await b.send("chat/completions", CHAT, stream=stream)
        assert not isinstance(info.value, UpstreamStatus)
    assert b.running == 0
    await b.aclose()


async def test_failure_mid_stream_raises_upstream_error(tiny: LoadedModel) -> None:
    # As an HTTP backend's stream does: the route turns it into a generic error event + [DONE]
    # (tests/router/test_hostile_streams.py); the exception's text is for the log only.
    body = {**CHAT, "temperature": 0, "ignore_eos": True, "max_tokens": 20}
    b = LocalBackend("small", recorded(tiny, fail_on=4)[0])
    with pytest.raises(UpstreamError):
        await b.send("chat/completions", body, stream=False)
    await b.aclose()
    b = LocalBackend("small", recorded(tiny, fail_on=4)[0])
    result = await b.send("chat/completions", body, stream=True)
    assert result.stream is not None
    raw: list[bytes] = []
    with pytest.raises(UpstreamError, match="simulated device failure") as info:
        async for chunk in result.stream:
            raw.append(chunk)
    await result.close()
    assert not isinstance(info.value, UpstreamStatus)
    chunks = events(b"".join(raw))
    assert len(chunks) >= 4  # role, then pieces from the first three tokens
    assert "[DONE]" not in chunks
    assert b.running == 0
    await b.aclose()


# -- cancellation and concurrency -------------------------------------------------------------


async def start_long(tiny: LoadedModel) -> tuple[LocalBackend, Recorder, UpstreamResult]:
    loaded, recorder = recorded(tiny)
    b = LocalBackend("small", loaded, max_new_tokens=4000)
    result = await b.send("chat/completions", LONG, stream=True)
    assert result.stream is not None
    first = await result.stream.__anext__()
    assert b'"role": "assistant"' in first
    return b, recorder, result


async def assert_stopped(b: LocalBackend, recorder: Recorder) -> None:
    await wait_idle(b, within=1.0)
    calls = len(recorder.calls)
    assert calls < 4000
    await anyio.sleep(0.2)
    assert len(recorder.calls) == calls  # no forward pass after the stop


async def test_close_stops_generation(tiny: LoadedModel) -> None:
    b, recorder, result = await start_long(tiny)
    start = time.monotonic()
    await result.close()
    assert time.monotonic() - start < 1.0
    assert b.running == 0
    await assert_stopped(b, recorder)
    await result.close()  # idempotent
    await b.aclose()


async def test_closing_the_iterator_stops_generation(tiny: LoadedModel) -> None:
    b, recorder, result = await start_long(tiny)
    await cast(AsyncGenerator[bytes, None], result.stream).aclose()
    await assert_stopped(b, recorder)
    await result.close()
    await b.aclose()


async def test_cancelled_consumer_stops_generation(tiny: LoadedModel) -> None:
    loaded, recorder = recorded(tiny)
    b = LocalBackend("small", loaded, max_new_tokens=4000)
    result = await b.send("chat/completions", LONG, stream=True)
    got_one = anyio.Event()

    async def consume(stream: AsyncIterator[bytes]) -> None:
        async for _ in stream:
            got_one.set()

    async with anyio.create_task_group() as tg:
        assert result.stream is not None
        tg.start_soon(consume, result.stream)
        await got_one.wait()
        tg.cancel_scope.cancel()
    await assert_stopped(b, recorder)
    await result.close()
    await b.aclose()


async def test_close_from_another_task_while_iterating(tiny: LoadedModel) -> None:
    b, recorder, result = await start_long(tiny)
    chunks: list[bytes] = []
    errors: list[UpstreamError] = []

    async def consume() -> None:
        assert result.stream is not None
        try:
            async for chunk in result.stream:
                chunks.append(chunk)
        except UpstreamError as exc:  # the stream ends unfinished, as a broken one does
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await anyio.sleep(0.05)
        await result.close()  # the consumer is mid-iteration in its own task
    await assert_stopped(b, recorder)
    assert [str(e.message) for e in errors] == [
        "backend 'small': generation stopped before it finished"
    ]
    assert chunks and b"[DONE]" not in b"".join(chunks)
    await b.aclose()


async def test_cancelled_non_stream_stops_generation(tiny: LoadedModel) -> None:
    loaded, recorder = recorded(tiny)
    b = LocalBackend("small", loaded, max_new_tokens=4000)
    with anyio.move_on_after(0.3) as scope:
        await b.send("chat/completions", LONG, stream=False)
    assert scope.cancelled_caught
    assert b.running == 0  # send waited for the thread before giving up
    await assert_stopped(b, recorder)
    await b.aclose()


async def test_aclose_stops_everything(tiny: LoadedModel) -> None:
    b, recorder, result = await start_long(tiny)
    await b.aclose()
    await assert_stopped(b, recorder)
    await result.close()
    with pytest.raises(UpstreamError, match="closed"):
        await b.send("chat/completions", CHAT, stream=False)


def interleavings(calls: list[threading.Thread]) -> int:
    return len([k for k, _ in itertools.groupby(calls)])


async def run_pair(tiny: LoadedModel, max_concurrency: int) -> tuple[list[threading.Thread], int]:
    loaded, recorder = recorded(tiny)
    b = LocalBackend("small", loaded, max_new_tokens=4000, max_concurrency=max_concurrency)
    body = {**CHAT, "ignore_eos": True, "max_tokens": 60}
    peak = 0

    async def one() -> None:
        parse(await b.send("chat/completions", body, stream=False))

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, b.running)
            await anyio.sleep(0.001)

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        async with anyio.create_task_group() as pair:
            pair.start_soon(one)
            pair.start_soon(one)
        tg.cancel_scope.cancel()
    await b.aclose()
    assert len(recorder.calls) == 120
    return recorder.calls, peak


async def test_concurrency_limit(tiny: LoadedModel) -> None:
    calls, peak = await run_pair(tiny, max_concurrency=1)
    assert len(set(calls)) == 2
    assert interleavings(calls) == 2  # one generation, then the other
    assert peak == 1
    # Control: with two slots the two generations do overlap.
    calls, peak = await run_pair(tiny, max_concurrency=2)
    assert interleavings(calls) > 2
    assert peak == 2


# -- the real model -------------------------------------------------------------------------


@pytest.mark.slow
async def test_smollm2_answers(bundled_probe: Any) -> None:
    loaded: LoadedModel = bundled_probe.loaded
    b = LocalBackend("small", loaded, model_name="smollm2", max_new_tokens=24)
    body = {
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0,
    }
    data = parse(await b.send("chat/completions", body, stream=False))
    text = data["choices"][0]["message"]["content"]
    assert isinstance(text, str)
    assert text.strip()
    chunks = await read_stream(await b.send("chat/completions", body, stream=True))
    assert content_of(chunks) == text
    # Same greedy tokens as transformers' own generate().
    tok = loaded.tokenizer
    prompt = tok.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        out = loaded.model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24
        )
    reference = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert text == reference
    await b.aclose()
