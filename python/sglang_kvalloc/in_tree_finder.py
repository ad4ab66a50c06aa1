"""Upstream's module names for this project's modules that would be upstream's.

The modules a pull request of the upstream series adds to SGLang live in this package under
``in_tree/`` at the paths they take in upstream's tree (``in_tree/sglang/srt/...``), written as
upstream code: they import upstream and each other by upstream names and nothing of
``sglang_kvalloc``. This finder makes those names importable where the plugin is installed
(``import sglang.srt.mem_cache.segmented``), so the plugin runs the very files the series
copies, byte for byte. Upstream's own files always win: the finder is consulted last and only
for names that upstream's tree does not have.

Kept import-light: the bootstrap ``.pth`` installs it in every Python process.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

IN_TREE = Path(__file__).resolve().parent / "in_tree"
UPSTREAM_ROOT = "sglang.srt."


def in_tree_file(fullname: str) -> tuple[Path, bool] | None:
    """The file of module ``fullname`` under ``in_tree/`` and whether it is a package."""
    if not fullname.startswith(UPSTREAM_ROOT):
        return None
    base = IN_TREE.joinpath(*fullname.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py", True
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py"), False
    return None


def in_tree_modules() -> list[str]:
    """Every module name ``in_tree/`` provides, sorted."""
    names = []
    for path in IN_TREE.rglob("*.py"):
        parts = list(path.relative_to(IN_TREE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return sorted(names)


def real_spec(
    skip: object, fullname: str, path: object, target: types.ModuleType | None
) -> importlib.machinery.ModuleSpec | None:
    """The spec the finders after ``skip`` give ``fullname``."""
    for finder in sys.meta_path:
        if finder is skip or not hasattr(finder, "find_spec"):
            continue
        spec = finder.find_spec(fullname, path, target)
        if spec is not None:
            return spec
    return None


class InTreeFinder(importlib.abc.MetaPathFinder):
    """Finds ``sglang.srt.*`` modules under ``in_tree/`` that no finder before it found."""

    def find_spec(
        self,
        fullname: str,
        path: object = None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        found = in_tree_file(fullname)
        if found is None:
            return None
        file, is_package = found
        return importlib.util.spec_from_file_location(
            fullname, file, submodule_search_locations=[str(file.parent)] if is_package else None
        )


def install() -> None:
    """Consult `InTreeFinder` after every other finder (idempotent)."""
    if not any(isinstance(f, InTreeFinder) for f in sys.meta_path):
        sys.meta_path.append(InTreeFinder())


def standalone(name: str) -> types.ModuleType:
    """In-tree module ``name``, which imports only the standard library, for code that must
    run where upstream's packages are not loaded: ``import sglang`` loads torch and most of
    SGLang, and the planner's CLI runs where torch does not. Under its upstream name where
    ``sglang`` is imported already (one module object per server process); otherwise
    loaded once from the same file as ``sglang_kvalloc.standalone.<name>``."""
    if sys.modules.get(name) is not None:
        return sys.modules[name]
    if sys.modules.get("sglang") is not None:
        return importlib.import_module(name)
    alias = f"{__package__}.standalone.{name}"
    if alias in sys.modules:
        return sys.modules[alias]
    found = in_tree_file(name)
    if found is None or found[1]:
        raise ImportError(f"{name} is no module of in_tree/")
    spec = importlib.util.spec_from_file_location(alias, found[0])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    spec.loader.exec_module(module)
    return module
