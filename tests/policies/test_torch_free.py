"""Loading a configuration needs neither torch nor transformers (``sparsity-router check``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = """\
import sys
from policies.loader import load_settings
import policies.reference
load_settings("config/default.yaml")
policies.reference.render()
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
assert not heavy, heavy
"""


def test_loading_a_config_does_not_import_torch() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
