"""The reviewer page's source: escalated content only ever reaches the DOM as text, and the page
is served with a nonce-based Content-Security-Policy (no inline script but its own)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from policies.loader import parse_settings
from probes.probe import SparsityProbe
from router.app import create_app
from router.escalations.page import REVIEW_PAGE, render_review_page
from tests.router.conftest import closed_port_url
from tests.router.escalation_helpers import escalation_yaml
from tests.servers import ServerThread

#: DOM sinks that parse HTML (or run code) from a string.
HTML_SINKS = (
    "innerHTML",
    "outerHTML",
    "insertAdjacentHTML",
    "document.write",
    "eval(",
    "Function(",
)


@pytest.fixture
def make_gateway_for_page(
    tiny_model_dir: Path, tiny_probe: SparsityProbe, tiny_calibration: Path, tmp_path: Path
) -> Iterator[ServerThread]:
    text = escalation_yaml(tiny_model_dir, tiny_calibration, closed_port_url())
    settings = parse_settings(text, source_name="gateway.yaml", base_dir=tmp_path)
    with ServerThread(create_app(settings, probe=tiny_probe)) as server:
        yield server


def _script(page: str) -> str:
    match = re.search(r"<script nonce=\"[^\"]+\">(.*?)</script>", page, re.S)
    assert match is not None
    return match.group(1)


def test_the_page_script_never_parses_html_from_strings() -> None:
    page = render_review_page("n0nce")
    assert page.count("<script") == 1  # one inline script, no external ones
    script = _script(page)
    for sink in HTML_SINKS:
        assert sink not in page, sink
    # content goes in through textContent (the el() helper) and replaceChildren/append only
    assert "e.textContent = String(text)" in script
    assert re.search(r"\.(src|href|srcdoc)\s*=", script) is None
    assert "setAttribute(" not in script


def test_the_page_is_served_with_a_fresh_nonce_csp(make_gateway_for_page: ServerThread) -> None:
    gw = make_gateway_for_page
    first = httpx.get(gw.url + "/review", timeout=10)
    second = httpx.get(gw.url + "/review", timeout=10)
    assert first.status_code == 200 and first.headers["content-type"].startswith("text/html")
    csp = first.headers["content-security-policy"]
    nonce = re.search(r"script-src 'nonce-([^']+)'", csp)
    assert nonce is not None and f'<script nonce="{nonce.group(1)}">' in first.text
    assert "unsafe-inline" not in csp and "default-src 'none'" in csp
    assert second.headers["content-security-policy"] != csp
    assert first.headers["x-content-type-options"] == "nosniff"
    assert "__NONCE__" not in first.text and "__NONCE__" in REVIEW_PAGE
