"""Load upstream's plugins as soon as `sglang.srt.entrypoints.engine` is imported.

Imported from `sglang_kvalloc_bootstrap.pth` at interpreter start: its only effect is one
import hook on that module. `Engine.__init__` loads plugins itself, but only once it is
already running, so without this a hook on `Engine.__init__` (the `kv_alloc_mode=` keyword)
would miss the first Engine of a process. `load_plugins()` is idempotent and upstream asks for
it "early in every process"; this only makes it earlier. Nothing else is imported until that
module is.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

ENGINE_MODULE = "sglang.srt.entrypoints.engine"


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


class _LoadPluginsAfterExec(importlib.abc.Loader):
    """Runs the real loader, then upstream's (idempotent) `load_plugins()`."""

    def __init__(self, real_loader: importlib.abc.Loader) -> None:
        self._real = real_loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._real.create_module(spec) if hasattr(self._real, "create_module") else None

    def exec_module(self, module: types.ModuleType) -> None:
        self._real.exec_module(module)
        from sglang.srt.plugins import load_plugins

        load_plugins()


class EarlyPluginLoading(importlib.abc.MetaPathFinder):
    """Wraps the Engine module's loader so that plugins load right after it."""

    def find_spec(
        self,
        fullname: str,
        path: object = None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != ENGINE_MODULE:
            return None
        spec = real_spec(self, fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _LoadPluginsAfterExec(spec.loader)
        return spec


def install() -> None:
    if not any(isinstance(f, EarlyPluginLoading) for f in sys.meta_path):
        sys.meta_path.insert(0, EarlyPluginLoading())


install()
