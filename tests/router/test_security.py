"""Scoped API keys (plain, ${ENV}, sha256), 401/403 envelopes, per-key rate limits, and secrets
kept out of logs and responses. The gateway runs on a real port, the openai SDK is the client."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

import httpx
import openai
import pytest

from policies.errors import ConfigError
from policies.loader import parse_settings
from tests.servers import FakeUpstream, ServerThread

Upstreams = dict[str, tuple[FakeUpstream, ServerThread]]
MakeGateway = Callable[..., ServerThread]

ADMIN_HASH = hashlib.sha256(b"admin-secret-7").hexdigest()
KEYS = (
    '["plain-client-1"], keys: ['
    '{key: "${SEC_TEST_CLIENT_KEY}", name: env-client}, '
    '{key: "sha256:' + ADMIN_HASH + '", scope: admin, name: ops}, '
    "{key: reviewer-key-3, scope: reviewer, name: rev}]"
)


def sdk(gw: ServerThread, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=20)


def ask(gw: ServerThread, key: str, prompt: str = "hello there") -> str:
    with sdk(gw, key) as c:
        out = c.chat.completions.create(
            model="small", messages=[{"role": "user", "content": prompt}]
        )
    return out.choices[0].message.content or ""


@pytest.fixture
def keyed_gateway(make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch) -> ServerThread:
    monkeypatch.setenv("SEC_TEST_CLIENT_KEY", "env-client-2")
    return make_gateway(api_keys=KEYS)


def test_plain_env_and_hashed_keys_are_accepted(keyed_gateway: ServerThread) -> None:
    for key in ("plain-client-1", "env-client-2", "admin-secret-7"):
        assert ask(keyed_gateway, key).startswith("answer from small")


def test_unknown_key_is_401_and_wrong_scope_403_in_the_envelope(
    keyed_gateway: ServerThread,
) -> None:
    with pytest.raises(openai.AuthenticationError) as e401:
        ask(keyed_gateway, "not-a-key")
    err = e401.value.response.json()["error"]
    assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
    assert set(err) == {"message", "type", "param", "code"}
    # the sha256 entry's hash itself is not a key
    with pytest.raises(openai.AuthenticationError):
        ask(keyed_gateway, ADMIN_HASH)
    with pytest.raises(openai.PermissionDeniedError) as e403:
        ask(keyed_gateway, "reviewer-key-3")
    err = e403.value.response.json()["error"]
    assert err["type"] == "permission_error" and err["code"] == "insufficient_scope"
    assert "rev" in err["message"] and "reviewer-key-3" not in err["message"]
    # admin routes: a client key is a 403, no key a 401
    r = httpx.post(
        keyed_gateway.url + "/admin/reload",
        headers={"authorization": "Bearer plain-client-1"},
        timeout=10,
    )
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    r = httpx.post(keyed_gateway.url + "/admin/reload", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    # an admin key passes the door (this in-process gateway has no file to reload: 404)
    r = httpx.post(
        keyed_gateway.url + "/admin/reload",
        headers={"authorization": "Bearer admin-secret-7"},
        timeout=10,
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "no_config_file"


def test_an_unset_env_key_is_dropped_and_a_bad_hash_names_the_path() -> None:
    base = """
backends: {small: {type: openai, base_urls: ["http://127.0.0.1:9/v1"]}}
policies: {default: {rules: [], default: small, on_probe_error: small}}
"""
    s = parse_settings(
        'auth: {keys: [{key: "${SEC_UNSET_KEY:-}"}]}' + base, env={}, source_name="a.yaml"
    )
    assert not s.auth.enabled
    with pytest.raises(ConfigError) as exc:
        parse_settings(
            "auth: {keys: [{key: 'sha256:abc', scope: admin}]}" + base, source_name="b.yaml"
        )
    text = str(exc.value)
    assert "b.yaml" in text and "auth.keys[0].key" in text and "64 hex digits" in text
    with pytest.raises(ConfigError) as exc:
        parse_settings("auth: {keys: [{key: k, scope: root}]}" + base, source_name="c.yaml")
    assert "auth.keys[0].scope" in str(exc.value)


def test_rate_limit_in_memory_answers_429_with_retry_after(make_gateway: MakeGateway) -> None:
    gw = make_gateway(
        api_keys="[], keys: [{key: ka, name: alice}, {key: kb, name: bob}, "
        "{key: km, scope: metrics, name: prom}], "
        "rate_limit: {requests_per_s: 0.2, burst: 3}"
    )
    for _ in range(3):
        ask(gw, "ka")
    with pytest.raises(openai.RateLimitError) as exc:
        ask(gw, "ka")
    response = exc.value.response
    assert response.status_code == 429
    assert 1 <= int(response.headers["retry-after"]) <= 5
    err = response.json()["error"]
    assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
    assert "alice" in err["message"] and "ka" not in err["message"].split()
    assert ask(gw, "kb").startswith("answer from small")  # bob has his own bucket
    metrics = httpx.get(gw.url + "/metrics", headers={"authorization": "Bearer km"}, timeout=10)
    assert 'sparsity_router_rate_limited_total{caller="alice"} 1.0' in metrics.text


def test_rate_limit_on_redis_is_shared_between_gateways(
    make_gateway: MakeGateway, redis_server: object
) -> None:
    url = redis_server.url  # type: ignore[attr-defined]
    keys = (
        "[], keys: [{key: ka, name: alice}], "
        f'rate_limit: {{requests_per_s: 0.2, burst: 4, redis_url: "{url}"}}'
    )
    a, b = make_gateway(api_keys=keys), make_gateway(api_keys=keys)
    ask(a, "ka")
    ask(b, "ka")
    ask(a, "ka")
    ask(b, "ka")
    with pytest.raises(openai.RateLimitError):
        ask(a, "ka")  # the fifth request, whichever gateway gets it
    with pytest.raises(openai.RateLimitError):
        ask(b, "ka")


def test_prompts_and_keys_never_reach_the_log_at_info(
    make_gateway: MakeGateway,
    upstreams: Upstreams,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SEC_UPSTREAM_KEY", "upstream-secret-key-xyz")
    gw = make_gateway(
        api_keys='["client-secret-key-abc"]',
        large_timeouts="api_key_env: SEC_UPSTREAM_KEY",
    )
    secret = "my very secret prompt 4242"
    caplog.set_level(logging.INFO)
    assert ask(gw, "client-secret-key-abc", secret)
    # the upstream got its key; errors from it are not echoed with it
    c = sdk(gw, "client-secret-key-abc")
    assert c.chat.completions.create(
        model="large", messages=[{"role": "user", "content": secret}], stream=False
    )
    for name in ("large", "large2"):
        upstreams[name][0].mode = "error500"
    seen: list[str] = []
    for model in ("large", "auto"):
        try:
            r = c.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": secret}]
            )
            seen.append(r.http_response.text + str(r.headers))
        except openai.APIStatusError as exc:
            seen.append(exc.response.text + str(exc.response.headers))
    c.close()
    with pytest.raises(openai.AuthenticationError) as bad:
        ask(gw, "wrong-key-" + secret)
    seen.append(bad.value.response.text)
    sent = [
        r["headers"]["authorization"] for n in ("large", "large2") for r in upstreams[n][0].requests
    ]
    assert sent and set(sent) == {"Bearer upstream-secret-key-xyz"}
    for text in seen:
        assert "upstream-secret-key-xyz" not in text
    log = "\n".join(r.getMessage() for r in caplog.records) + caplog.text
    assert caplog.records  # the gateway did log at INFO and above
    for needle in (secret, "client-secret-key-abc", "upstream-secret-key-xyz", "4242"):
        assert needle not in log
