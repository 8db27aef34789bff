"""Dependencies point down: the package's import graph, read with ``ast`` (nothing is imported).

Every ``import`` / ``from ... import`` of ``sd35flash`` counts, including the ones inside functions:
a lazy import is still a dependency. The rules are the table :data:`RULES`; the cycle check runs
over the top-level packages and modules of ``sd35flash`` (``world``, ``deploy``, ``io``, ...).
"""

from __future__ import annotations

import ast
import functools
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "sd35flash"

#: Modules that wire several packages together for the command line. They may import anything
#: (they sit at the top); nothing but another command imports them.
COMMANDS = {
    "sd35flash.__main__",
    "sd35flash.cli",
    "sd35flash.deploy.commands",
    "sd35flash.study.commands",
    "sd35flash.demo",
    "sd35flash.ship",
}

#: (importer, "only" | "not", module prefixes, why). An importer is a module or package prefix;
#: "only" lists everything it may import of sd35flash (besides itself), "not" what it must not.
RULES: list[tuple[str, str, tuple[str, ...], str]] = [
    ("sd35flash.world", "only", ("sd35flash.errors", "sd35flash.io"),
     "the shapes world is a leaf: it imports nothing of the project but errors/io-level helpers"),
    ("sd35flash.deploy.runtime", "not", ("sd35flash.world", "sd35flash.evaluate"),
     "the deployment runtime runs any model; it does not depend on the shapes world or the evaluation"),
    ("sd35flash.deploy.runtime", "not", ("sd35flash.deploy.tools", "sd35flash.deploy.commands"),
     "the runtime is below the deployment tools and their CLI wiring"),
    ("sd35flash.deploy.export", "not", ("sd35flash.deploy.runtime", "sd35flash.deploy.tools",
                                        "sd35flash.deploy.commands", "sd35flash.world", "sd35flash.evaluate"),
     "the ONNX exporter is below the runtime that switches to it"),
    ("sd35flash.evaluate", "not", ("sd35flash.distill", "sd35flash.pretrain", "sd35flash.deploy"),
     "the measuring stick does not depend on the method it measures"),
    ("sd35flash.distill", "not", ("sd35flash.pretrain", "sd35flash.deploy", "sd35flash.evaluate"),
     "distillation works on any teacher, not on the toy teacher's package, and not on deployment tools"),
    ("sd35flash.plan", "not", ("sd35flash.deploy", "sd35flash.distill"),
     "the memory arithmetic is below both planners' users (distill's memory check, deploy's tools)"),
    ("sd35flash.models", "not", ("sd35flash.distill", "sd35flash.pretrain", "sd35flash.evaluate",
                                 "sd35flash.deploy", "sd35flash.world"),
     "models/ builds, loads and saves pipelines for everyone above it"),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@functools.cache
def import_edges() -> tuple[tuple[str, str, int], ...]:
    """``(importer, imported module, line)`` for every import of sd35flash, relative ones resolved;
    ``from pkg import name`` counts as an import of ``pkg.name`` when that is a module."""
    modules = _modules()
    edges = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges += [(name, a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "sd35flash"]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "sd35flash":
                    continue
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
                edges += [(name, t, node.lineno) for t in (subs or [target])]
    return tuple(edges)


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_edges_are_found():
    """The parser sees relative, absolute, lazy and ``from pkg import module`` imports."""
    edges = {(a, b) for a, b, _ in import_edges()}
    assert ("sd35flash.__main__", "sd35flash.cli") in edges
    assert ("sd35flash.sampling", "sd35flash.flow") in edges  # from . import flow
    assert ("sd35flash.world.spec", "sd35flash.io") in edges  # inside a function
    assert ("sd35flash.deploy.runtime.pipeline", "sd35flash.deploy.runtime.presets") in edges
    assert len(edges) > 300


def test_every_import_names_an_existing_module():
    """A moved module leaves no import behind that points at its old place (lazy ones included)."""
    modules = set(_modules())
    bad = [f"{a} -> {b} (line {line})" for a, b, line in import_edges() if b not in modules]
    assert not bad, "imports of modules that do not exist: " + "; ".join(bad)


@pytest.mark.parametrize("importer,kind,targets,why", RULES, ids=[f"{r[0]}-{r[1]}" for r in RULES])
def test_rule(importer, kind, targets, why):
    bad = []
    for a, b, line in import_edges():
        if not _under(a, importer) or _under(b, importer) or a in COMMANDS:
            continue
        hit = any(_under(b, t) for t in targets)
        if (kind == "only") != hit:
            bad.append(f"{a} -> {b} (line {line})")
    assert not bad, f"{why}; these imports break it: " + "; ".join(bad)


def test_nothing_imports_a_command_but_a_command():
    bad = [f"{a} -> {b} (line {line})" for a, b, line in import_edges()
           if any(_under(b, c) for c in COMMANDS) and a not in COMMANDS]
    assert not bad, ("command modules (cli, */commands, demo, ship) sit at the top; move the helper "
                     "they share below its users: " + "; ".join(bad))


def test_no_cycle_between_top_level_packages():
    graph: dict[str, set[str]] = defaultdict(set)
    where: dict[tuple[str, str], str] = {}
    for a, b, line in import_edges():
        ta, tb = _top(a), _top(b)
        if ta != tb and tb != "sd35flash":
            graph[ta].add(tb)
            where.setdefault((ta, tb), f"{a} -> {b} (line {line})")
    cycles = []
    for start in sorted(graph):  # every simple cycle through its smallest node, by depth-first search
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph[node]):
                if nxt == start:
                    cycles.append(path + [start])
                elif nxt > start and nxt not in path:
                    stack.append((nxt, path + [nxt]))
    named = [" -> ".join(c) + " [" + "; ".join(where[(x, y)] for x, y in zip(c, c[1:])) + "]" for c in cycles]
    assert not cycles, "import cycles between top-level packages: " + " | ".join(named)
