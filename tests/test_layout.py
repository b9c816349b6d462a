"""The layout the docs promise: every module named in docs/architecture.md (and nothing named
there that is gone), no module over 400 lines unless it says why, no import cycle."""

from __future__ import annotations

import ast
import re

from support import ROOT

PACKAGE = ROOT / "captioning"
MODULES = sorted(p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py"))


def test_every_module_is_named_in_the_architecture_doc_and_every_named_one_exists():
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`(captioning/[\w/]+\.py)`", doc))
    assert not [m for m in MODULES if m not in named], "modules missing from docs/architecture.md"
    assert not sorted(named - set(MODULES)), "docs/architecture.md names modules that do not exist"


def test_modules_over_400_lines_say_why_in_their_first_lines():
    for module in MODULES:
        text = (ROOT / module).read_text(encoding="utf-8")
        if text.count("\n") > 400:
            assert "Over 400 lines on purpose" in "\n".join(text.splitlines()[:4]), module


def _imports(module: str) -> set[str]:
    """The captioning modules ``module`` imports anywhere (also inside functions)."""
    names = {m.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for m in MODULES}
    found = set()
    for node in ast.walk(ast.parse((ROOT / module).read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("captioning"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in names else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("captioning")}
    return {n for n in found if n in names}


def test_no_import_cycle_between_modules():
    graph = {m.removesuffix(".py").removesuffix("/__init__").replace("/", "."): _imports(m) for m in MODULES}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(name) :] + [name]))
        if name in done:
            return
        for dep in graph[name]:
            visit(dep, path + [name])
        done.add(name)

    for name in graph:
        visit(name, [])
