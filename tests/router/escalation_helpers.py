"""Helpers for the escalation tests: a gateway config with human tiers, and API calls."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from tests.router.conftest import probe_yaml
from tests.servers import ServerThread

CLIENT_A = "client-key-a"
CLIENT_B = "client-key-b"
REVIEWER = "reviewer-key-r"


def escalation_yaml(
    tiny_model_dir: Path,
    calibration: Path,
    small_url: str,
    *,
    store: str = "path: escalations.sqlite",
    wait_s: float = 20,
    on_timeout: str = "small",
    extra_escalation: str = "",
    auth: bool = True,
    human_fallback: str = "[]",
) -> str:
    keys = (
        f'{{api_keys: ["{CLIENT_A}", "{CLIENT_B}"], '
        f"keys: [{{key: {REVIEWER}, scope: reviewer, name: rita}}], public_metrics: true}}"
        if auth
        else "{}"
    )
    return f"""
auth: {keys}
{probe_yaml(tiny_model_dir, calibration)}
backends:
  small: {{type: openai, base_urls: ["{small_url}"], model: small-served}}
  desk:
    type: human
    mode: ticket
    ticket_message: "Ticket {{id}}: a person will answer."
    fallback: {human_fallback}
  holder:
    type: human
    mode: hold
    wait_s: {wait_s}
    keepalive_s: 0.3
    on_timeout: {on_timeout}
virtual_models:
  auto: {{policy: default}}
  ask-ticket: {{policy: ticket}}
  ask-human: {{policy: hold}}
policies:
  default: {{default: small, on_probe_error: small}}
  ticket:
    rules: [{{name: sparsest, when: {{percentile: {{min: 0}}}}, route: desk}}]
    default: small
    on_probe_error: small
  hold:
    rules: [{{name: sparsest, when: {{percentile: {{min: 0}}}}, route: holder}}]
    default: small
    on_probe_error: small
escalation:
  {store}
  lease_s: 30
  expire_s: 600
  {extra_escalation}
"""


def api(
    gw: ServerThread, method: str, path: str, key: str | None = REVIEWER, **kw: Any
) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, gw.url + path, headers=headers, timeout=10, **kw)


def wait_for_open(gw: ServerThread, count: int = 1, timeout: float = 15) -> list[dict[str, Any]]:
    """Poll the reviewer list until ``count`` open escalations are there."""
    deadline = time.monotonic() + timeout
    while True:
        data: list[dict[str, Any]] = api(gw, "GET", "/v1/escalations?status=open").json()["data"]
        if len(data) >= count:
            return data
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(data)} open escalations after {timeout} s, wanted {count}")
        time.sleep(0.05)
