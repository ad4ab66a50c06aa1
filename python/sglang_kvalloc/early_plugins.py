"""Load upstream's plugins as soon as `sglang.srt.entrypoints.engine` is imported, and declare
this package's fields before `ServerArgs` is assembled.

Imported from `sglang_kvalloc_bootstrap.pth` at interpreter start: its only effect is an
import hook on three modules. `sglang.srt.arg_groups.fields`: its `collect_input_fields`, which
`server_args` calls at import to assemble `ServerArgs`, also collects `KvAlloc`
(`upstream/fields.py`). `sglang.srt.entrypoints.engine`: upstream's plugins load right after
it; `load_plugins()` is idempotent and upstream asks for it "early in every process", and this
only makes it earlier than `Engine.__init__` does. `sglang.srt.disaggregation.mooncake.conn`
(imported by PD servers only): the plugin's hooks on it are applied then. Nothing else is
imported until those modules are.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Callable

from sglang_kvalloc.in_tree_finder import real_spec
from sglang_kvalloc.on_import import ON_IMPORT_MODULES

ENGINE_MODULE = "sglang.srt.entrypoints.engine"
FIELDS_MODULE = "sglang.srt.arg_groups.fields"


def _load_plugins(module: types.ModuleType) -> None:
    from sglang.srt.plugins import load_plugins

    load_plugins()


def _declare_kv_alloc_fields(module: types.ModuleType) -> None:
    from sglang_kvalloc.upstream.fields import with_kv_alloc_fields

    module.collect_input_fields = with_kv_alloc_fields(module.collect_input_fields)


def _apply_hooks_on_import(module: types.ModuleType) -> None:
    from sglang_kvalloc.upstream.plugin import apply_on_import

    apply_on_import(module.__name__)


# Module -> what runs right after it is executed.
AFTER_EXEC: dict[str, Callable[[types.ModuleType], None]] = {
    ENGINE_MODULE: _load_plugins,
    FIELDS_MODULE: _declare_kv_alloc_fields,
    **dict.fromkeys(ON_IMPORT_MODULES, _apply_hooks_on_import),
}


class _RunAfterExec(importlib.abc.Loader):
    """Runs the real loader, then the module's `AFTER_EXEC` step."""

    def __init__(self, real_loader: importlib.abc.Loader) -> None:
        self._real = real_loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._real.create_module(spec) if hasattr(self._real, "create_module") else None

    def exec_module(self, module: types.ModuleType) -> None:
        self._real.exec_module(module)
        AFTER_EXEC[module.__name__](module)


class EarlyPluginLoading(importlib.abc.MetaPathFinder):
    """Wraps the loaders of the modules in `AFTER_EXEC`."""

    def find_spec(
        self,
        fullname: str,
        path: object = None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in AFTER_EXEC:
            return None
        spec = real_spec(self, fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _RunAfterExec(spec.loader)
        return spec


def install() -> None:
    if not any(isinstance(f, EarlyPluginLoading) for f in sys.meta_path):
        sys.meta_path.insert(0, EarlyPluginLoading())


install()
