"""The package's shape: no cycle among its modules, `core/` free of upstream (but for the
modules that would be upstream's, `in_tree/`, which import nothing else of it), every import
inside a function (in `core/` and `upstream/`) there for a stated reason, no module over
600 lines.

Imports are read from the source (ast), at module level and inside functions; those under
``if TYPE_CHECKING:`` are for type checkers only and never run, so they are left out.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import sglang_kvalloc
from sglang_kvalloc import in_tree_finder
from sglang_kvalloc_harness import series

PACKAGE = "sglang_kvalloc"
ROOT = Path(sglang_kvalloc.__file__).resolve().parent
# Third-party modules imported inside functions on purpose: prometheus_client reads upstream's
# multiprocess directory when first imported (after upstream set it); cuda-python's driver
# bindings exist only on NVIDIA machines.
OPTIONAL_DEPENDENCIES = ("prometheus_client", "cuda.bindings")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {
    _module_name(p): p
    for p in sorted(ROOT.rglob("*.py"))
    if not p.relative_to(ROOT).parts[0] == "in_tree"
}
# The modules that would be upstream's, by their upstream names (in_tree_finder).
IN_TREE = set(in_tree_finder.in_tree_modules())


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
    return isinstance(node, ast.If) and name == "TYPE_CHECKING"


def _imports(
    tree: ast.AST, in_function: bool = False, type_checking: bool = False
) -> Iterator[tuple[str, bool, int]]:
    """(imported name, inside a function?, line) for every import that runs (``type_checking``:
    and those only type checkers read)."""
    for node in ast.iter_child_nodes(tree):
        if _is_type_checking(node) and not type_checking:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, in_function, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, in_function, node.lineno
            for alias in node.names:
                yield f"{node.module}.{alias.name}", in_function, node.lineno
        nested = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        yield from _imports(node, nested, type_checking)


def _targets(importer: str, name: str) -> list[str]:
    """The package's modules an imported name executes (not the importer's own parents)."""
    if name not in MODULES or importer == name or importer.startswith(name + "."):
        return []
    return [name]


def _graph(type_checking: bool = False) -> dict[str, dict[str, set[tuple[str, bool, int]]]]:
    """importer -> {"package": {(module, in function, line)}, "other": {(name, ...)}}."""
    graph: dict[str, dict[str, set[tuple[str, bool, int]]]] = {}
    for module, path in MODULES.items():
        edges: dict[str, set[tuple[str, bool, int]]] = {"package": set(), "other": set()}
        tree = ast.parse(path.read_text())
        for name, in_function, line in _imports(tree, type_checking=type_checking):
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                edges["package"] |= {(t, in_function, line) for t in _targets(module, name)}
            else:
                edges["other"].add((name, in_function, line))
        graph[module] = edges
    return graph


GRAPH = _graph()
TYPED_GRAPH = _graph(type_checking=True)


def _cycles(graph: dict[str, dict[str, set[tuple[str, bool, int]]]] = GRAPH) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), or self-loops."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target, _, _ in graph[node]["package"]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def _imports_upstream_at_import(module: str, seen: set[str] | None = None) -> bool:
    """Whether importing ``module`` imports upstream SGLang (through module-level imports)."""
    seen = set() if seen is None else seen
    if module in seen:
        return False
    seen.add(module)
    edges = GRAPH[module]
    if any(n.split(".")[0] == "sglang" for n, fn, _ in edges["other"] if not fn):
        return True
    return any(_imports_upstream_at_import(t, seen) for t, fn, _ in edges["package"] if not fn)


def _series_owner() -> dict[str, int]:
    """The PR of the upstream series (series.py) each module comes with."""
    owner = {}
    for p in series.plan():
        for rel in p.files:
            if rel.endswith(".py"):
                dotted = rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
                owner[f"{PACKAGE}.{dotted}"] = p.pr.number
    return owner


def function_level_imports() -> dict[str, list[tuple[str, str, int, str]]]:
    """Imports inside functions in core/ and upstream/, each with its reason (or "")."""
    owner = _series_owner()
    reasons: dict[str, list[tuple[str, str, int, str]]] = {}
    for module, edges in sorted(GRAPH.items()):
        if not module.startswith((f"{PACKAGE}.core", f"{PACKAGE}.upstream")):
            continue
        rows = []
        for target, in_function, line in sorted(edges["package"]):
            if not in_function:
                continue
            if _imports_upstream_at_import(target):
                why = "imports upstream at import time"
            elif owner.get(target, 0) > owner.get(module, 0):
                why = f"comes with PR {owner[target]} of the upstream series"
            else:
                why = ""
            rows.append((module, target, line, why))
        for name, in_function, line in sorted(edges["other"]):
            if not in_function:
                continue
            if name.split(".")[0] == "sglang":
                why = "upstream, not imported at import time"
            elif name.startswith(OPTIONAL_DEPENDENCIES):
                why = "optional dependency"
            else:
                why = ""
            rows.append((module, name, line, why))
        reasons[module] = _one_per_statement(rows)
    return reasons


def _one_per_statement(rows: list[tuple[str, str, int, str]]) -> list[tuple[str, str, int, str]]:
    """One row per import statement (``from X import Y`` yields X and X.Y): the shortest."""
    by_line: dict[int, tuple[str, str, int, str]] = {}
    for row in sorted(rows, key=lambda r: (r[2], len(r[1]))):
        by_line.setdefault(row[2], row)
    return sorted(by_line.values(), key=lambda r: r[2])


def test_no_import_cycle_among_the_package_modules() -> None:
    assert _cycles() == []


def test_no_import_cycle_even_counting_type_checking_imports() -> None:
    """A cycle only type checkers see is still two modules that each need the other."""
    assert _cycles(TYPED_GRAPH) == []


def _in_tree(name: str) -> bool:
    """An upstream name served by ``in_tree/`` (a module of it, or a name in one)."""
    return name in IN_TREE or name.rpartition(".")[0] in IN_TREE


def test_the_core_imports_nothing_of_upstream() -> None:
    """Nothing but the modules that would be upstream's, which import nothing else of
    upstream (test_in_tree.py)."""
    upstream = [
        (module, name)
        for module, edges in GRAPH.items()
        if module.startswith(f"{PACKAGE}.core")
        for name, _, _ in edges["other"]
        if name.split(".")[0] == "sglang" and not _in_tree(name)
    ]
    upstream += [
        (module, target)
        for module, edges in GRAPH.items()
        if module.startswith(f"{PACKAGE}.core")
        for target, _, _ in edges["package"]
        if not target.startswith((f"{PACKAGE}.core", f"{PACKAGE}.in_tree_finder"))
    ]
    assert upstream == []


def test_every_import_inside_a_function_has_a_reason(capsys: pytest.CaptureFixture) -> None:
    rows = [row for rows in function_level_imports().values() for row in rows]
    with capsys.disabled():
        print(f"\n{len(rows)} imports inside functions in core/ and upstream/:")
        for module, target, line, why in rows:
            print(f"  {module}:{line} -> {target} ({why or 'NO REASON'})")
    assert [row for row in rows if not row[3]] == []


def test_no_module_is_over_600_lines() -> None:
    long = {
        str(path.relative_to(ROOT)): n
        for path in MODULES.values()
        if (n := len(path.read_text().splitlines())) > 600
    }
    assert long == {}
