"""Every import of this project's own modules names something that exists, including the
imports inside functions that only a rare path runs (a budget, a GPU, PD): a module moved
or renamed must not leave an import that fails only on that path, in the server.

Read from the source (ast), so nothing is imported; upstream's names are not checked here
(upstream's own modules are what the hooks' tests import).
"""

from __future__ import annotations

import ast
from pathlib import Path

import sglang_kvalloc
from sglang_kvalloc import in_tree_finder

PACKAGE = "sglang_kvalloc"
ROOT = Path(sglang_kvalloc.__file__).resolve().parent


def _own_file(name: str) -> Path | None:
    """The file of this project's module ``name`` (the plugin's, or in-tree by its upstream
    name), or None."""
    if name == PACKAGE or name.startswith(PACKAGE + "."):
        base = ROOT.joinpath(*name.split(".")[1:])
        for path in (base / "__init__.py", base.with_suffix(".py")):
            if path.is_file():
                return path
        return None
    found = in_tree_finder.in_tree_file(name)
    return found[0] if found is not None else None


def _is_own_package(name: str) -> bool:
    """Whether ``name`` is a package of this project's (its children are ours to check)."""
    path = _own_file(name)
    return path is not None and path.name == "__init__.py"


def _top_level_names(path: Path) -> set[str]:
    """Names a module defines or imports at its top level (inside ``if``/``try`` too)."""
    names: set[str] = set()
    todo = list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.If, ast.Try)):
            todo.extend(node.body + node.orelse)
            for handler in getattr(node, "handlers", []):
                todo.extend(handler.body)
            todo.extend(getattr(node, "finalbody", []))
    return names


def _unresolved(path: Path) -> list[str]:
    problems = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
            pairs: list[tuple[str, str | None]] = [(m, None) for m in modules]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            pairs = [(node.module, a.name) for a in node.names]
        else:
            continue
        for module, name in pairs:
            parent = module.rpartition(".")[0]
            if _own_file(module) is None and not _is_own_package(parent):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            file = _own_file(module)
            if file is None:
                problems.append(f"{where}: no module {module}")
            elif name is not None and name != "*":
                submodule = _own_file(f"{module}.{name}")
                if submodule is None and name not in _top_level_names(file):
                    problems.append(f"{where}: {module} has no {name}")
    return problems


def test_every_import_of_our_modules_resolves() -> None:
    files = sorted(ROOT.rglob("*.py"))
    assert len(files) > 60
    problems = [p for f in files for p in _unresolved(f)]
    assert problems == []


def test_the_check_finds_a_name_that_moved() -> None:
    """The check itself: an import inside a function of a module that is gone is reported."""
    stale = ROOT / "upstream" / "_stale_import_probe.py"
    stale.write_text(
        "def f():\n"
        "    from sglang_kvalloc.upstream import no_such_module\n"
        "    from sglang.srt.mem_cache.segmented import no_such_either\n"
        "    from sglang.srt.mem_cache.segmented.runtime import NO_SUCH_NAME\n"
        "    from sglang.srt.mem_cache.segmented.runtime import RUNTIME\n"
    )
    try:
        problems = _unresolved(stale)
    finally:
        stale.unlink()
    assert [p.split(": ", 1)[1] for p in problems] == [
        "sglang_kvalloc.upstream has no no_such_module",
        "sglang.srt.mem_cache.segmented has no no_such_either",
        "sglang.srt.mem_cache.segmented.runtime has no NO_SUCH_NAME",
    ]
