"""The house rules, checked: packages import one way, public names import, the repo stands alone."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("probes", "policies", "router", "evaluation", "cli")
#: Which packages each may import (the arrows of docs/architecture.md).
ALLOWED = {
    "probes": set(),
    "policies": {"probes"},
    "router": {"policies", "probes"},
    "evaluation": {"router", "policies", "probes"},
    "cli": {"evaluation", "router", "policies", "probes"},
}


def _checker() -> ModuleType:
    path = ROOT / "scripts" / "check_imports.py"
    spec = importlib.util.spec_from_file_location("check_imports", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building the class
    spec.loader.exec_module(module)
    return module


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            names.append(".".join(parts))
    return names


def test_no_import_cycles_and_no_private_imports() -> None:
    problems = _checker().problems(ROOT, PACKAGES)
    assert problems == []


def test_packages_import_only_downwards() -> None:
    checker = _checker()
    graph = checker.module_imports(ROOT, PACKAGES)
    wrong = sorted(
        f"{imp.importer}:{imp.line} imports {imp.module}"
        for imports in graph.values()
        for imp in imports
        if (target := imp.module.split(".")[0]) in ALLOWED
        and target != imp.importer.split(".")[0]
        and target not in ALLOWED[imp.importer.split(".")[0]]
    )
    assert wrong == []


def test_checker_finds_a_cycle_and_a_private_import(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg.b import _g\n")
    (pkg / "b.py").write_text("from pkg import a\n\ndef _g(): ...\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
    )
    problems = _checker().problems(tmp_path, ["pkg"])
    assert problems == [
        "import cycle: pkg.a <-> pkg.b",
        "private import: pkg.a:2 takes _g from pkg.b",
    ]


@pytest.mark.parametrize("name", _modules())
def test_public_names_import(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    missing = [n for n in exported if not hasattr(module, n)]
    assert missing == [], f"{name}.__all__ names what it does not define: {missing}"


#: A clone has only itself: no sibling folders, no absolute paths of the machine it was made on.
NEEDLES = ("../" + "shared", "/work/" + "shared", "/work/" + "main")


def test_no_path_outside_the_repository() -> None:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    offenders = []
    for rel in files:
        path = ROOT / rel
        if path.suffix in {".png", ".sqlite"} or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if any(needle in text for needle in NEEDLES):
            offenders.append(rel)
    assert offenders == [], "files that reach outside the repository: " + ", ".join(offenders)
