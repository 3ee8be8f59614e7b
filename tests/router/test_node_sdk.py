"""The official openai Node SDK (tests/node, `make node-sdk`) against a real gateway on loopback:
chat, stream, tools, Responses (plain and streamed) and embeddings (fake upstreams in mode
"tools"), run with `node --test`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.servers import FakeUpstream, ServerThread

NODE_DIR = Path(__file__).resolve().parents[1] / "node"
NODE = shutil.which("node")

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not installed (Node 20+ runs tests/node)"),
    pytest.mark.skipif(
        not (NODE_DIR / "node_modules" / "openai" / "package.json").is_file(),
        reason="tests/node/node_modules is missing: run `make node-sdk` "
        "(npm ci --prefix tests/node)",
    ),
]


def test_node_openai_sdk_chat_stream_tools(
    make_gateway: Callable[..., ServerThread],
    upstreams: dict[str, tuple[FakeUpstream, ServerThread]],
) -> None:
    for fake, _server in upstreams.values():
        fake.mode = "tools"
    gw = make_gateway()
    env = {**os.environ, "GATEWAY_URL": gw.url + "/v1", "NO_COLOR": "1"}
    env.pop("GATEWAY_API_KEY", None)
    env.pop("GATEWAY_MODEL", None)
    assert NODE is not None
    try:
        proc = subprocess.run(
            [NODE, "--test", "--test-reporter=tap", "--test-timeout=60000"],
            cwd=NODE_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"node --test ran past 180 s:\n{exc.stdout!r}\n{exc.stderr!r}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    passed = re.search(r"^# pass (\d+)$", out, re.MULTILINE)
    failed = re.search(r"^# fail (\d+)$", out, re.MULTILINE)
    assert passed and failed, out[-3000:]
    assert int(failed.group(1)) == 0 and int(passed.group(1)) >= 10, out[-3000:]
    # The Node requests went through the gateway to the upstreams: the tool definitions, the
    # streamed requests, and the tool result of the second turn.
    bodies = [r["body"] for fake, _ in upstreams.values() for r in fake.requests]
    assert any(b.get("tools") and b.get("stream") for b in bodies)
    assert any(
        m.get("role") == "tool" and m.get("tool_call_id") == "call_1"
        for b in bodies
        for m in b.get("messages", [])
    )
    paths = [r["path"] for fake, _ in upstreams.values() for r in fake.requests]
    assert any(p.endswith("/responses") for p in paths)
    assert any(p.endswith("/embeddings") for p in paths)
