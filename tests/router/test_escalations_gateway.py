"""The human tier through the gateway on real ports, the openai SDK as client: tickets and
polling (own key vs foreign key), hold mode answered in time (streaming and not), rejected, and
timing out to the fallback backend; the reviewer API's errors; a restart with pending
escalations; the webhook; two gateways sharing one Redis queue."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from router.escalations.webhook import signature
from tests.redis_server import RedisServer
from tests.router.escalation_helpers import (
    CLIENT_A,
    CLIENT_B,
    REVIEWER,
    api,
    escalation_yaml,
    wait_for_open,
)
from tests.servers import FakeUpstream, ServerThread, receive_body, serve_lifespan

MakeGateway = Callable[..., ServerThread]


@pytest.fixture
def small() -> Iterator[ServerThread]:
    server = ServerThread(FakeUpstream(name="small")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def make_esc_gateway(
    tiny_model_dir: Path,
    tiny_calibration: Path,
    small: ServerThread,
    serve_yaml: Callable[[str], ServerThread],
) -> MakeGateway:
    def make(**kw: Any) -> ServerThread:
        return serve_yaml(
            escalation_yaml(tiny_model_dir, tiny_calibration, small.url + "/v1", **kw)
        )

    return make


def sdk(gw: ServerThread, key: str = CLIENT_A, timeout: float = 30) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=timeout)


def ask(gw: ServerThread, model: str, text: str = "Please check my refund", **kw: Any) -> Any:
    with sdk(gw) as client:
        return client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": text}], **kw
        )


def test_ticket_then_polling_with_own_and_foreign_keys(make_esc_gateway: MakeGateway) -> None:
    gw = make_esc_gateway()
    raw = ask(gw, "ask-ticket", user="u-7", metadata={"team": "billing"})
    id = raw.headers["x-router-escalation-id"]
    assert id.startswith("esc_") and raw.headers["x-router-backend"] == "desk"
    assert raw.headers["x-router-rule"] == "sparsest"
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == f"Ticket {id}: a person will answer."

    mine = api(gw, "GET", f"/v1/escalations/{id}", CLIENT_A)
    assert mine.status_code == 200
    assert mine.json() == {
        "id": id,
        "object": "escalation",
        "status": "pending",
        "created": mine.json()["created"],
        "updated": mine.json()["updated"],
        "completion": None,
        "reason": None,
    }
    for key, status in ((CLIENT_B, 404), (None, 401), ("nope", 401)):
        r = api(gw, "GET", f"/v1/escalations/{id}", key)
        assert r.status_code == status, r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert "Please check" not in api(gw, "GET", f"/v1/escalations/{id}", CLIENT_B).text

    # the reviewer sees the whole request, its probe result and rule
    listed = api(gw, "GET", "/v1/escalations").json()["data"]
    assert [e["id"] for e in listed] == [id]
    e = listed[0]
    assert e["messages"] == [{"role": "user", "content": "Please check my refund"}]
    assert (e["rule"], e["policy"], e["mode"], e["user"]) == ("sparsest", "ticket", "ticket", "u-7")
    assert e["metadata"] == {"team": "billing"}
    assert isinstance(e["score"], float) and 0 <= e["percentile"] <= 1
    assert "owner" not in e and CLIENT_A not in json.dumps(e)

    assert api(gw, "POST", f"/v1/escalations/{id}/claim").json()["claimed_by"] == "rita"
    answer = {"content": "Your refund was sent today."}
    done = api(gw, "POST", f"/v1/escalations/{id}/answer", json=answer)
    assert done.status_code == 200 and done.json()["status"] == "answered"
    # idempotent: the same answer again is a 200 with the same record
    again = api(gw, "POST", f"/v1/escalations/{id}/answer", json=answer)
    assert again.status_code == 200 and again.json()["updated"] == done.json()["updated"]

    polled = api(gw, "GET", f"/v1/escalations/{id}", CLIENT_A).json()
    assert polled["status"] == "answered"
    c = polled["completion"]
    assert c["object"] == "chat.completion" and c["model"] == "ask-ticket"
    assert c["choices"][0]["message"] == {"role": "assistant", "content": answer["content"]}
    assert api(gw, "GET", f"/v1/escalations/{id}", CLIENT_B).status_code == 404

    metrics = httpx.get(gw.url + "/metrics", timeout=10).text
    assert 'sparsity_router_escalations_created_total{backend="desk",mode="ticket"} 1.0' in metrics
    assert 'sparsity_router_escalations_closed_total{status="answered"} 1.0' in metrics
    assert "sparsity_router_escalations_pending 0.0" in metrics


def test_ticket_streams_as_chunks(make_esc_gateway: MakeGateway) -> None:
    gw = make_esc_gateway()
    with sdk(gw) as client:
        stream = client.chat.completions.create(
            model="ask-ticket", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    (e,) = wait_for_open(gw)
    assert text == f"Ticket {e['id']}: a person will answer."


def test_reviewer_api_errors_are_envelopes(make_esc_gateway: MakeGateway) -> None:
    gw = make_esc_gateway()
    id = ask(gw, "ask-ticket").headers["x-router-escalation-id"]
    cases: list[tuple[str, str, str | None, Any, int, str]] = [
        ("GET", "/v1/escalations", CLIENT_A, None, 403, "permission_error"),
        ("GET", "/v1/escalations", None, None, 401, "authentication_error"),
        ("GET", "/v1/escalations?status=done", REVIEWER, None, 400, "invalid_request_error"),
        ("GET", "/v1/escalations?limit=0", REVIEWER, None, 400, "invalid_request_error"),
        (
            "POST",
            f"/v1/escalations/{id}/answer",
            REVIEWER,
            {"content": " "},
            400,
            "invalid_request_error",
        ),
        (
            "POST",
            f"/v1/escalations/{id}/answer",
            REVIEWER,
            {"content": 3},
            422,
            "invalid_request_error",
        ),
        (
            "POST",
            f"/v1/escalations/{id}/answer",
            REVIEWER,
            {"text": "x"},
            400,
            "invalid_request_error",
        ),
        (
            "POST",
            f"/v1/escalations/{id}/answer",
            CLIENT_A,
            {"content": "x"},
            403,
            "permission_error",
        ),
        ("POST", "/v1/escalations/esc_0000/claim", REVIEWER, None, 404, "not_found_error"),
        ("DELETE", f"/v1/escalations/{id}", REVIEWER, None, 405, "invalid_request_error"),
    ]
    for method, path, key, body, status, type_ in cases:
        r = api(gw, method, path, key, json=body)
        assert (r.status_code, r.json()["error"]["type"]) == (status, type_), (path, r.text)
    r = api(gw, "POST", f"/v1/escalations/{id}/answer", content=b"{not json")
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert (
        api(gw, "POST", f"/v1/escalations/{id}/reject", json={"reason": "spam"}).status_code == 200
    )
    r = api(gw, "POST", f"/v1/escalations/{id}/answer", json={"content": "too late"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "escalation_conflict"
    assert "already rejected" in r.json()["error"]["message"]
    polled = api(gw, "GET", f"/v1/escalations/{id}", CLIENT_A).json()
    assert (polled["status"], polled["reason"], polled["completion"]) == ("rejected", "spam", None)


def _answer_when_open(gw: ServerThread, content: str, out: dict[str, float]) -> threading.Thread:
    def run() -> None:
        (e,) = wait_for_open(gw)
        out["answered_at"] = time.perf_counter()
        r = api(gw, "POST", f"/v1/escalations/{e['id']}/answer", json={"content": content})
        assert r.status_code == 200, r.text

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_hold_answered_in_time_plain_and_streaming(make_esc_gateway: MakeGateway) -> None:
    gw = make_esc_gateway()
    times: dict[str, float] = {}
    reviewer = _answer_when_open(gw, "A person says: yes.", times)
    raw = ask(gw, "ask-human")
    received = time.perf_counter()
    reviewer.join(10)
    assert raw.parse().choices[0].message.content == "A person says: yes."
    assert raw.headers["x-router-backend"] == "holder"
    assert raw.headers["x-router-escalation-id"].startswith("esc_")
    print(
        f"hold, non-streaming: answer to receipt {1000 * (received - times['answered_at']):.1f} ms"
    )

    reviewer = _answer_when_open(gw, "Streamed from a person.", times)
    with sdk(gw) as client:
        stream = client.chat.completions.create(
            model="ask-human", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        chunks = list(stream)
    received = time.perf_counter()
    reviewer.join(10)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Streamed from a person."
    assert chunks[-1].choices[0].finish_reason == "stop"
    print(f"hold, streaming: answer to receipt {1000 * (received - times['answered_at']):.1f} ms")


def test_hold_rejected_is_a_403_envelope(make_esc_gateway: MakeGateway) -> None:
    gw = make_esc_gateway()

    def reject() -> None:
        (e,) = wait_for_open(gw)
        api(gw, "POST", f"/v1/escalations/{e['id']}/reject", json={"reason": "out of scope"})

    thread = threading.Thread(target=reject, daemon=True)
    thread.start()
    with pytest.raises(openai.PermissionDeniedError) as info:
        ask(gw, "ask-human")
    thread.join(10)
    err = info.value.response.json()["error"]
    assert err["code"] == "escalation_rejected" and "out of scope" in err["message"]


def test_hold_times_out_to_the_fallback_backend(make_esc_gateway: MakeGateway) -> None:
    gw = make_esc_gateway(wait_s=0.8)
    raw = ask(gw, "ask-human")
    assert raw.parse().choices[0].message.content == "answer from small"
    assert raw.headers["x-router-backend"] == "small"
    assert raw.headers["x-router-fallback"] == "holder"
    id = raw.headers["x-router-escalation-id"]
    record = api(gw, "GET", f"/v1/escalations/{id}").json()
    assert record["status"] == "expired" and "backend 'small' answered" in record["reason"]

    # streaming: ': waiting' keep-alives while held, then the fallback's own chunks
    body = {"model": "ask-human", "messages": [{"role": "user", "content": "x"}], "stream": True}
    with httpx.stream(
        "POST",
        gw.url + "/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {CLIENT_A}"},
        timeout=10,
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
        text = "".join(r.iter_text())
    assert text.startswith(": waiting\n\n") and text.count(": waiting") >= 2
    assert '"tok0 "' in text and text.rstrip().endswith("data: [DONE]")


def test_hold_timeout_can_answer_with_a_ticket(make_esc_gateway: MakeGateway) -> None:
    gw = make_esc_gateway(wait_s=0.3, on_timeout="ticket")
    raw = ask(gw, "ask-human")
    id = raw.headers["x-router-escalation-id"]
    assert (
        raw.parse()
        .choices[0]
        .message.content.startswith(f"A person will answer this request. Your ticket is {id}")
    )
    assert api(gw, "GET", f"/v1/escalations/{id}", CLIENT_A).json()["status"] == "pending"


def test_restart_keeps_pending_escalations(make_esc_gateway: MakeGateway) -> None:
    first = make_esc_gateway()
    ids = [
        ask(first, "ask-ticket", text=f"q{i}").headers["x-router-escalation-id"] for i in range(3)
    ]
    api(first, "POST", f"/v1/escalations/{ids[0]}/claim")
    first.stop()
    second = make_esc_gateway()
    open_now = api(second, "GET", "/v1/escalations?status=open").json()["data"]
    assert [e["id"] for e in open_now] == ids
    assert [e["messages"][0]["content"] for e in open_now] == ["q0", "q1", "q2"]
    assert open_now[0]["status"] == "claimed" and open_now[0]["claimed_by"] == "rita"
    r = api(second, "POST", f"/v1/escalations/{ids[1]}/answer", json={"content": "after restart"})
    assert r.status_code == 200
    polled = api(second, "GET", f"/v1/escalations/{ids[1]}", CLIENT_A).json()
    assert polled["completion"]["choices"][0]["message"]["content"] == "after restart"


class Hook:
    """A webhook receiver: fails the first ``fail`` deliveries with a 500."""

    def __init__(self, fail: int) -> None:
        self.fail = fail
        self.calls: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        raw = await receive_body(receive)
        self.calls.append(json.loads(raw))
        self.bodies.append(raw)
        self.headers.append({k.decode(): v.decode() for k, v in scope["headers"]})
        status = 500 if len(self.calls) <= self.fail else 204
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def test_webhook_is_retried_and_failures_are_counted(make_esc_gateway: MakeGateway) -> None:
    hook = Hook(fail=1)
    with ServerThread(hook) as receiver:
        gw = make_esc_gateway(extra_escalation=f"webhook: {{url: '{receiver.url}/hook'}}")
        started = time.perf_counter()
        raw = ask(gw, "ask-ticket")
        assert time.perf_counter() - started < 5  # the request does not wait for the webhook
        id = raw.headers["x-router-escalation-id"]
        deadline = time.monotonic() + 10
        while len(hook.calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert [c["id"] for c in hook.calls] == [id, id]
    assert hook.calls[1]["event"] == "escalation.created" and hook.calls[1]["rule"] == "sparsest"
    assert "messages" not in hook.calls[1]
    metrics = httpx.get(gw.url + "/metrics", timeout=10).text
    assert 'sparsity_router_escalation_webhook_total{result="delivered"} 1.0' in metrics
    assert "x-router-signature" not in hook.headers[0]  # no secret configured: unsigned


def test_webhook_deliveries_are_signed(
    make_esc_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOOK_SECRET", "s3cret")
    hook = Hook(fail=0)
    with ServerThread(hook) as receiver:
        gw = make_esc_gateway(
            extra_escalation=f"webhook: {{url: '{receiver.url}/hook', secret: '${{HOOK_SECRET}}'}}"
        )
        ask(gw, "ask-ticket")
        deadline = time.monotonic() + 10
        while not hook.calls and time.monotonic() < deadline:
            time.sleep(0.05)
    headers, body = hook.headers[0], hook.bodies[0]
    stamp = headers["x-router-timestamp"]
    assert abs(int(stamp) - time.time()) < 60
    assert headers["x-router-signature"] == signature("s3cret", stamp, body)
    assert headers["x-router-signature"] != signature("wrong", stamp, body)
    assert "s3cret" not in body.decode()


def test_two_gateways_share_one_redis_queue(
    make_esc_gateway: MakeGateway, redis_server: RedisServer
) -> None:
    store = f"store: redis\n  redis_url: {redis_server.url}"
    a, b = make_esc_gateway(store=store), make_esc_gateway(store=store)
    times: dict[str, float] = {}
    reviewer = _answer_when_open(b, "answered on gateway B", times)  # lists and answers on B
    raw = ask(a, "ask-human")  # held on A
    received = time.perf_counter()
    reviewer.join(10)
    assert raw.parse().choices[0].message.content == "answered on gateway B"
    print(
        "hold across gateways (Redis): answer to receipt "
        f"{1000 * (received - times['answered_at']):.1f} ms"
    )


def test_with_redis_each_webhook_is_sent_by_exactly_one_gateway(
    make_esc_gateway: MakeGateway, redis_server: RedisServer
) -> None:
    hook = Hook(fail=0)
    with ServerThread(hook) as receiver:
        store = (
            f"store: redis\n  redis_url: {redis_server.url}\n"
            f"  webhook: {{url: '{receiver.url}/hook'}}"
        )
        a, b = make_esc_gateway(store=store), make_esc_gateway(store=store)
        ids = [
            ask(gw, "ask-ticket", text=f"q{i}").headers["x-router-escalation-id"]
            for i, gw in enumerate((a, b, a, b))
        ]
        deadline = time.monotonic() + 10
        while len(hook.calls) < len(ids) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # time for any duplicate delivery to show up
    assert sorted(c["id"] for c in hook.calls) == sorted(ids)  # each once, none twice
    delivered = [
        metric(gw, 'sparsity_router_escalation_webhook_total{result="delivered"}') for gw in (a, b)
    ]
    assert sum(delivered) == len(ids)


def metric(gw: ServerThread, name: str) -> float:
    for line in httpx.get(gw.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_a_client_leaving_a_hold_keeps_the_escalation(make_esc_gateway: MakeGateway) -> None:
    gw = make_esc_gateway()
    body = {"model": "ask-human", "messages": [{"role": "user", "content": "still there?"}]}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            gw.url + "/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {CLIENT_A}"},
            timeout=httpx.Timeout(10, read=0.5),
        )
    (e,) = wait_for_open(gw)
    assert e["status"] == "pending"  # a reviewer can still answer; the client may poll
    deadline = time.monotonic() + 5
    while (
        metric(gw, 'sparsity_router_requests_total{backend="holder",rule="sparsest",status="499"}')
        != 1
    ):
        assert time.monotonic() < deadline, "the abandoned hold was not counted as a 499"
        time.sleep(0.05)
    assert httpx.get(gw.url + "/healthz", timeout=5).status_code == 200


def test_a_queue_outage_goes_to_the_fallback_or_is_a_503(
    make_esc_gateway: MakeGateway, redis_server: RedisServer
) -> None:
    store = f"store: redis\n  redis_url: {redis_server.url}"
    with_fallback = make_esc_gateway(store=store, human_fallback="[small]")
    without = make_esc_gateway(store=store)
    redis_server.kill()
    raw = ask(with_fallback, "ask-ticket")
    assert raw.parse().choices[0].message.content == "answer from small"
    assert (raw.headers["x-router-backend"], raw.headers["x-router-fallback"]) == ("small", "desk")
    assert metric(with_fallback, "sparsity_router_escalation_store_errors_total") == 1
    with pytest.raises(openai.InternalServerError) as info:
        ask(without, "ask-ticket")
    assert info.value.status_code == 503
    assert "escalation queue is unavailable" in info.value.response.json()["error"]["message"]


def test_with_auth_off_nothing_is_stored_about_keys_and_anyone_may_poll(
    make_esc_gateway: MakeGateway, tmp_path: Path
) -> None:
    gw = make_esc_gateway(auth=False)
    id = ask(gw, "ask-ticket").headers["x-router-escalation-id"]
    assert api(gw, "POST", f"/v1/escalations/{id}/answer", None, json={"content": "hi"}).is_success
    polled = api(gw, "GET", f"/v1/escalations/{id}", None).json()
    assert polled["completion"]["choices"][0]["message"]["content"] == "hi"
    with sqlite3.connect(tmp_path / "escalations.sqlite") as db:
        assert db.execute("SELECT owner FROM escalations WHERE id = ?", (id,)).fetchone() == (None,)


def test_the_store_keeps_a_hash_of_the_client_key_never_the_key(
    make_esc_gateway: MakeGateway, tmp_path: Path
) -> None:
    gw = make_esc_gateway()
    id = ask(gw, "ask-ticket").headers["x-router-escalation-id"]
    path = tmp_path / "escalations.sqlite"
    with sqlite3.connect(path) as db:
        (owner,) = db.execute("SELECT owner FROM escalations WHERE id = ?", (id,)).fetchone()
    assert owner == hashlib.sha256(CLIENT_A.encode()).hexdigest()
    files = [path, *tmp_path.glob("escalations.sqlite-*")]
    assert not any(CLIENT_A.encode() in f.read_bytes() for f in files)


def test_completions_endpoint_gets_text_completions(make_esc_gateway: MakeGateway) -> None:
    gw = make_esc_gateway()
    with sdk(gw) as client:
        raw = client.completions.with_raw_response.create(model="ask-ticket", prompt="Why?")
    id = raw.headers["x-router-escalation-id"]
    completion = raw.parse()
    assert completion.object == "text_completion"
    assert completion.choices[0].text == f"Ticket {id}: a person will answer."
    record = api(gw, "GET", f"/v1/escalations/{id}").json()
    assert (record["endpoint"], record["prompt"], record["messages"]) == (
        "completions",
        "Why?",
        None,
    )
    api(gw, "POST", f"/v1/escalations/{id}/answer", json={"content": "Because."})
    polled = api(gw, "GET", f"/v1/escalations/{id}", CLIENT_A).json()["completion"]
    assert polled["object"] == "text_completion" and polled["choices"][0]["text"] == "Because."
