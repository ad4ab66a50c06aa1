"""Make `sgl_kernel` importable on machines where its CUDA build cannot load.

Imported from `sglang_kvalloc_bootstrap.pth` at interpreter start, in every process
(scheduler and detokenizer processes are spawned and import upstream's memory pool, which
imports `sgl_kernel` at module level, before any plugin has run).

It costs nothing until something imports `sgl_kernel`. Then the real package is executed
first; only if that raises ImportError/OSError (no libcuda, no CPU build on the index) is
the module filled with the pure-torch fallbacks from `sgl_kernel_cpu`. A machine with a
working kernel build never sees the fallback.

Set SGLANG_KVALLOC_DISABLE_KERNEL_FALLBACK=1 to turn this off.

It also runs upstream's `load_plugins()` right after `sglang.srt.entrypoints.engine` is
imported. `Engine.__init__` loads plugins itself, but only once it is already running, so
without this a hook on `Engine.__init__` (the `kv_alloc_mode=` keyword) would miss the first
Engine of a process. `load_plugins()` is idempotent and upstream asks for it "early in every
process"; this only makes it earlier.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types

FALLBACK_ENV = "SGLANG_KVALLOC_DISABLE_KERNEL_FALLBACK"
TARGET = "sgl_kernel"
ENGINE_MODULE = "sglang.srt.entrypoints.engine"


class _GuardedLoader(importlib.abc.Loader):
    """Runs the real loader; on failure turns the module into the CPU fallback."""

    def __init__(self, real_loader: importlib.abc.Loader | None) -> None:
        self._real = real_loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        if self._real is not None and hasattr(self._real, "create_module"):
            return self._real.create_module(spec)
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        before = set(sys.modules)
        if self._real is None:
            reason = "the package is not installed"
        else:
            try:
                self._real.exec_module(module)
                return
            except (ImportError, OSError) as exc:  # no libcuda.so.1, no CPU build
                reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1]}"
        # Drop submodules the failed attempt left behind; they hold half-loaded state.
        for name in set(sys.modules) - before:
            if name.startswith(TARGET + "."):
                del sys.modules[name]
        from sglang_kvalloc.kernels import sgl_kernel_cpu

        sgl_kernel_cpu.populate(module, reason)


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


def _real_spec(
    skip: object, fullname: str, path: object, target: types.ModuleType | None
) -> importlib.machinery.ModuleSpec | None:
    for finder in sys.meta_path:
        if finder is skip or not hasattr(finder, "find_spec"):
            continue
        spec = finder.find_spec(fullname, path, target)
        if spec is not None:
            return spec
    return None


class KvAllocImportHooks(importlib.abc.MetaPathFinder):
    """Wraps the real loaders of `sgl_kernel` (fallback) and the Engine module (plugins)."""

    def find_spec(
        self,
        fullname: str,
        path: object = None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == ENGINE_MODULE:
            spec = _real_spec(self, fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _LoadPluginsAfterExec(spec.loader)
            return spec
        if fullname != TARGET or os.environ.get(FALLBACK_ENV, "") in ("1", "true", "True"):
            return None
        real_spec = _real_spec(self, fullname, path, target)
        if real_spec is None:
            return importlib.machinery.ModuleSpec(TARGET, _GuardedLoader(None), is_package=True)
        real_spec.loader = _GuardedLoader(real_spec.loader)
        return real_spec


def install() -> None:
    if not any(isinstance(f, KvAllocImportHooks) for f in sys.meta_path):
        sys.meta_path.insert(0, KvAllocImportHooks())


install()
