"""Check the project's import structure: no cycles, no private names across modules.

Usage: ``python scripts/check_imports.py ROOT PACKAGE...`` (e.g. ``. probes policies router
evaluation cli``). Every ``import`` counts, at module level or inside a function, except those
under ``if TYPE_CHECKING:``. Exit status 1 with one line per problem:

- a cycle among modules (a strongly connected component of the module graph);
- a cycle among the packages themselves (``router`` → ``policies`` → ``router``);
- ``from a.b import _name`` where ``_name`` is private to another module.

Standard library only, so CI and the tests can run it without the project's dependencies.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Import",
    "cycles",
    "main",
    "module_imports",
    "package_cycles",
    "private_imports",
    "problems",
]


@dataclass(frozen=True, slots=True)
class Import:
    """One import statement's target, as seen from ``importer`` at ``line``."""

    importer: str
    module: str
    names: tuple[str, ...]
    line: int


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _walk(node: ast.AST) -> Iterator[ast.AST]:
    """Every node below ``node``, skipping the bodies of ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield other
                yield from _walk(other)
            continue
        yield child
        yield from _walk(child)


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def module_imports(root: Path, packages: Iterable[str]) -> dict[str, list[Import]]:
    """Module name -> the project imports it makes (TYPE_CHECKING blocks left out)."""
    result: dict[str, list[Import]] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            name = _module_name(root, path)
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            found: list[Import] = []
            for node in _walk(tree):
                if isinstance(node, ast.Import):
                    found.extend(Import(name, a.name, (), node.lineno) for a in node.names)
                elif isinstance(node, ast.ImportFrom):
                    target = _resolve(name, path.name == "__init__.py", node)
                    if target == "__future__":
                        continue
                    names = tuple(a.name for a in node.names)
                    found.append(Import(name, target, names, node.lineno))
            result[name] = found
    return result


def _edges(graph: Mapping[str, list[Import]]) -> dict[str, set[str]]:
    """Module -> project modules it imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    edges: dict[str, set[str]] = {name: set() for name in graph}
    for name, imports in graph.items():
        for imp in imports:
            targets = [f"{imp.module}.{n}" for n in imp.names if f"{imp.module}.{n}" in graph]
            if (imp.module in graph and len(targets) < len(imp.names)) or not imp.names:
                targets.append(imp.module)
            edges[name].update(t for t in targets if t in graph and t != name)
    return edges


def _components(edges: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        component.append(top)
                        if top == node:
                            break
                    found.append(sorted(component))
    return found


def cycles(graph: Mapping[str, list[Import]]) -> list[list[str]]:
    """Groups of modules that import each other, directly or through others."""
    edges = _edges(graph)
    return [c for c in _components(edges) if len(c) > 1]


def package_cycles(graph: Mapping[str, list[Import]]) -> list[list[str]]:
    """Groups of top-level packages that import each other."""
    top: dict[str, set[str]] = {}
    for name, targets in _edges(graph).items():
        mine = name.split(".")[0]
        top.setdefault(mine, set()).update(
            t.split(".")[0] for t in targets if t.split(".")[0] != mine
        )
    return [c for c in _components(top) if len(c) > 1]


def private_imports(graph: Mapping[str, list[Import]]) -> list[Import]:
    """``from other_module import _private`` (dunders allowed)."""
    bad = []
    for imports in graph.values():
        for imp in imports:
            if imp.module.split(".")[0] not in {n.split(".")[0] for n in graph}:
                continue
            private = tuple(n for n in imp.names if n.startswith("_") and not n.startswith("__"))
            if private or any(p.startswith("_") for p in imp.module.split(".")):
                bad.append(Import(imp.importer, imp.module, private, imp.line))
    return bad


def problems(root: Path, packages: Iterable[str]) -> list[str]:
    """Every problem as one printable line."""
    graph = module_imports(root, packages)
    lines = [f"import cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    lines += [f"package cycle: {' <-> '.join(c)}" for c in package_cycles(graph)]
    lines += [
        f"private import: {imp.importer}:{imp.line} takes {', '.join(imp.names) or imp.module}"
        f" from {imp.module}"
        for imp in private_imports(graph)
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    found = problems(Path(args[0]).resolve(), args[1:])
    for line in found:
        print(line)
    print(f"{len(found)} problem(s) in {', '.join(args[1:])}")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
