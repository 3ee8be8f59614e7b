"""The gateway labels its own traffic against a real vLLM server: the small answer, the shadow
call and the judge all come from SmolLM2-135M-Instruct (served as ``small`` and ``large``), so
the verdict parser reads a real model's free text. Each job must end as a stored label or a
counted ``unparsed`` verdict; no client request fails."""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path

import httpx
import openai

from policies.loader import parse_settings
from router.app import create_app
from tests.e2e.conftest import VllmServers
from tests.servers import ServerThread, wait_for

PROMPTS = [
    "What is the capital of France? Answer in one word.",
    "Name a primary colour.",
]
#: Short answers and judgements: a shared 2-core CPU generates a few tokens a second.
MAX_TOKENS, JUDGE_MAX_TOKENS = 12, 40


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = "^" + re.escape(f"{name}{{{want}}}" if want else name) + r" ([0-9.e+]+)$"
    found = re.search(pattern, text, re.M)
    return float(found.group(1)) if found else 0.0


def test_real_judge_verdicts_are_labels_or_counted(
    vllm_servers: VllmServers, tmp_path: Path
) -> None:
    gen = vllm_servers.generate.url
    events = tmp_path / "events.sqlite"
    text = f"""
backends:
  small: {{type: openai, base_urls: ["{gen}"], model: small, timeouts: {{read_s: 120}}}}
  large: {{type: openai, base_urls: ["{gen}"], model: large, timeouts: {{read_s: 120}}}}
  judge: {{type: openai, base_urls: ["{gen}"], model: large, timeouts: {{read_s: 180}}}}
policies:
  default:
    rules:
      - {{name: asked-large, when: {{header: {{x-tier: large}}}}, route: large}}
    default: small
    on_probe_error: small
events: {{sink: sqlite, path: "{events}"}}
labelling:
  enabled: true
  sample: 1.0
  judge: judge
  judge_max_tokens: {JUDGE_MAX_TOKENS}
  max_shadow_per_s: 100
  store_text: true
"""
    settings = parse_settings(text, source_name="labelling-e2e.yaml", base_dir=tmp_path)
    with ServerThread(create_app(settings, labelling_seed=0)) as gateway:
        client = openai.OpenAI(
            base_url=gateway.url + "/v1", api_key="none", max_retries=0, timeout=180
        )
        for i, prompt in enumerate(PROMPTS):
            messages: list[dict[str, str]] = [{"role": "user", "content": prompt}]
            if i % 2:  # streamed, answered by large: the shadow goes to small
                stream = client.chat.completions.create(
                    model="auto",
                    messages=messages,  # type: ignore[arg-type]
                    max_tokens=MAX_TOKENS,
                    stream=True,
                    extra_headers={"x-tier": "large"},
                )
                assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            else:
                answer = client.chat.completions.create(
                    model="auto",
                    messages=messages,  # type: ignore[arg-type]
                    max_tokens=MAX_TOKENS,
                )
                assert answer.choices[0].message.content

        def metrics() -> str:
            return httpx.get(gateway.url + "/metrics", timeout=10).text

        def finished() -> bool:
            m = metrics()
            stored = _metric(m, "sparsity_router_labels_stored_total")
            lost = sum(
                _metric(m, "sparsity_router_judge_verdicts_total", verdict=v)
                for v in ("unparsed", "failed")
            )
            failed = _metric(m, "sparsity_router_shadow_calls_total", outcome="failed")
            return stored + lost + failed >= len(PROMPTS)

        started = time.monotonic()
        assert wait_for(finished, timeout=600), metrics()
        seconds = time.monotonic() - started
        time.sleep(0.5)  # the event writer's linger
        m = metrics()

    count = {
        v: _metric(m, "sparsity_router_judge_verdicts_total", verdict=v)
        for v in ("large", "small", "tie", "unparsed", "failed")
    }
    stored = _metric(m, "sparsity_router_labels_stored_total")
    sent = _metric(m, "sparsity_router_shadow_calls_total", outcome="sent")
    print(f"\nlabelling e2e: {count}, {stored:g} labels, jobs judged in {seconds:.0f} s")
    assert sent == len(PROMPTS)
    assert _metric(m, "sparsity_router_shadow_calls_total", outcome="failed") == 0
    assert count["failed"] == 0
    # Every job ends as a label (two parsed verdicts) or one unparsed verdict (then no more).
    assert stored + count["unparsed"] == len(PROMPTS)
    parsed = count["large"] + count["small"] + count["tie"]
    assert 2 * stored <= parsed <= 2 * stored + count["unparsed"]
    assert _metric(m, "sparsity_router_shadow_cost_tokens_total") > 0
    with sqlite3.connect(events) as db:
        rows = db.execute("SELECT large_better, verdicts, small_answer FROM labels").fetchall()
    assert len(rows) == stored
    for large_better, verdicts, small_answer in rows:
        assert large_better in (0.0, 0.5, 1.0) and verdicts and small_answer
