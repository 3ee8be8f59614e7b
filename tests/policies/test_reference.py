"""The configuration reference: every key documented, docs/configuration.md in step with it."""

from __future__ import annotations

from pathlib import Path

import pytest

from policies.loader import load_settings
from policies.reference import main, render, undocumented

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "configuration.md"
EXAMPLES = ROOT / "config" / "examples"


def test_every_field_has_a_description() -> None:
    assert undocumented() == [], "add Field(description=...) to these keys"


def test_docs_configuration_is_up_to_date() -> None:
    assert PAGE.read_text(encoding="utf-8") == render(), (
        "docs/configuration.md is out of date: python -m policies.reference > docs/configuration.md"
    )


def test_the_page_documents_every_section_and_variant() -> None:
    page = render()
    for heading in (
        "## `server`",
        "### `auth.keys[]`",
        "### `probe.batching`",
        "### `backends.<name>` (type: openai)",
        "### `backends.<name>` (type: human)",
        "### `policies.<name>.rules[].when`",
        "### `experiments[].arms[]`",
        "### `escalation.webhook`",
        "## `events`",
    ):
        assert f"\n{heading}\n" in page
    assert "| `port` | integer (≥ 0, ≤ 65535) | `8080` | TCP port to listen on" in page
    # inherited probe settings are documented with the probe section
    assert "| `max_tokens` | integer (≥ 2, ≤ 131072) | `512` |" in page


def test_links_point_at_anchors() -> None:
    page = render()
    ids = {part.split('"')[0] for part in page.split('<a id="')[1:]}
    targets = {part.split(")")[0] for part in page.split("](#")[1:]}
    assert targets and targets <= ids
    assert len(ids) == page.count('<a id="')  # no duplicates


def test_main_prints_the_page(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert capsys.readouterr().out == render()
    assert main(["--oops"]) == 2


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_loads(path: Path) -> None:
    settings = load_settings(path, env={})
    assert settings.backends and settings.policies
