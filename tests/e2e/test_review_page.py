"""The reviewer page in a real headless Chromium (Debian's ``chromium``, driven by Playwright):
sign in with a reviewer key, see a held request appear, open it, answer it, and the waiting
openai-SDK client receives that answer. The request carries hostile HTML, which must show as
text and never run.

``SPARSITY_ROUTER_SCREENSHOT=docs/review-page.png`` saves a screenshot of the page there (the
README's picture); otherwise it goes to the test's temporary folder.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from policies.loader import parse_settings
from probes.calibration import Calibration
from probes.probe import SparsityProbe
from router.app import create_app
from tests.router.conftest import REFERENCE
from tests.router.escalation_helpers import CLIENT_A, REVIEWER, api, escalation_yaml
from tests.servers import FakeUpstream, ServerThread

HOSTILE = "<img src=x onerror=alert(1)><script>alert(2)</script> Why was I charged twice?"


@pytest.fixture
def gateway(
    tiny_model_dir: Path, tiny_probe: SparsityProbe, tmp_path: Path
) -> Iterator[ServerThread]:
    calibration = tmp_path / "calibration.json"
    results = tiny_probe.measure(REFERENCE)
    Calibration.fit(results, tiny_probe.fingerprint(), min_per_bucket=16).save(calibration)
    with ServerThread(FakeUpstream(name="small")) as small:
        text = escalation_yaml(tiny_model_dir, calibration, small.url + "/v1", wait_s=60)
        settings = parse_settings(text, source_name="gateway.yaml", base_dir=tmp_path)
        with ServerThread(create_app(settings, probe=tiny_probe)) as gw:
            yield gw


@pytest.fixture
def browser() -> Iterator[Any]:
    executable = shutil.which("chromium")
    if executable is None:
        pytest.skip(
            "no chromium binary on PATH: install Debian's chromium (`make chromium`, i.e. "
            "apt-get install -y chromium) to run the reviewer-page browser test"
        )
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the playwright package (dev extra) is not installed"
    )
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=executable,
            headless=True,
            args=["--no-sandbox", "--disable-dev-shm-usage"],
            timeout=30_000,
        )
        try:
            yield browser
        finally:
            browser.close()


def _hold_request(gw: ServerThread, out: dict[str, Any]) -> threading.Thread:
    def run() -> None:
        with openai.OpenAI(
            base_url=gw.url + "/v1", api_key=CLIENT_A, max_retries=0, timeout=60
        ) as client:
            try:
                completion = client.chat.completions.create(
                    model="ask-human",
                    messages=[
                        {"role": "system", "content": "You are the billing assistant."},
                        {"role": "user", "content": HOSTILE},
                    ],
                    user="customer-1042",
                )
                out["content"] = completion.choices[0].message.content
            except Exception as exc:  # reported by the test's assertion
                out["error"] = exc
            out["received_at"] = time.perf_counter()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_reviewer_answers_a_held_request_in_the_browser(
    gateway: ServerThread, browser: Any, tmp_path: Path
) -> None:
    # two older tickets, so the queue shows more than one row
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key=CLIENT_A, max_retries=0) as c:
        for text in ("Can I move my plan to another account?", "Is the invoice VAT included?"):
            c.chat.completions.create(
                model="ask-ticket", messages=[{"role": "user", "content": text}]
            )

    page = browser.new_page(viewport={"width": 1360, "height": 820})
    page.set_default_timeout(15_000)
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    page.goto(gateway.url + "/review")
    page.fill("#token", "wrong-key")
    page.click("#login-button")
    page.wait_for_selector("#login-error:has-text('invalid API key')")
    page.fill("#token", REVIEWER)
    page.click("#login-button")
    page.wait_for_selector("#app:not([hidden])")
    page.wait_for_selector("#queue tbody tr >> nth=1")

    result: dict[str, Any] = {}
    client = _hold_request(gateway, result)
    row = page.locator("#queue tbody tr", has_text="Why was I charged twice?")
    row.wait_for()  # appears without a reload (the page polls every 2 s)
    row.click()
    user_msg = page.locator("#conversation .msg.user .text")
    user_msg.wait_for()
    assert user_msg.text_content() == HOSTILE  # shown literally
    assert page.locator("#conversation img, #conversation script").count() == 0
    assert page.locator("#facts").text_content() is not None
    assert "customer-1042" in (page.locator("#facts").text_content() or "")

    page.click("#claim")
    page.wait_for_selector("#detail-status.claimed")
    page.fill("#answer-text", "You were charged once; the second line is a pending hold.")
    shot = Path(os.environ.get("SPARSITY_ROUTER_SCREENSHOT") or tmp_path / "review-page.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot))
    answered_at = time.perf_counter()
    page.click("#send-answer")
    page.wait_for_selector("#detail-status.answered")
    client.join(30)
    assert "error" not in result, result.get("error")
    assert result["content"] == "You were charged once; the second line is a pending hold."
    print(
        "browser answer click to client receipt: "
        f"{1000 * (result['received_at'] - answered_at):.0f} ms"
    )

    assert dialogs == [] and errors == []
    assert page.evaluate("typeof window.__xss") == "undefined"
    record = api(gateway, "GET", "/v1/escalations?status=answered").json()["data"][0]
    assert record["answered_by"] == "rita" and record["messages"][1]["content"] == HOSTILE
    page.close()
