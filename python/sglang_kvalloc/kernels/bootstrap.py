"""Make `sgl_kernel` importable on machines where its CUDA build cannot load.

Imported from `sglang_kvalloc_bootstrap.pth` at interpreter start, in every process
(scheduler and detokenizer processes are spawned and import upstream's memory pool, which
imports `sgl_kernel` at module level, before any plugin has run).

It costs nothing until something imports `sgl_kernel`. Then the real package is executed
first; only if that raises ImportError/OSError (no libcuda, no CPU build on the index) is
the module filled with the pure-torch fallbacks from `sgl_kernel_cpu`. A machine with a
working kernel build never sees the fallback.

Set SGLANG_KVALLOC_DISABLE_KERNEL_FALLBACK=1 to turn this off.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types

FALLBACK_ENV = "SGLANG_KVALLOC_DISABLE_KERNEL_FALLBACK"
TARGET = "sgl_kernel"


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


class SglKernelFallbackFinder(importlib.abc.MetaPathFinder):
    """Finds the real `sgl_kernel` spec and wraps its loader in `_GuardedLoader`."""

    def find_spec(
        self,
        fullname: str,
        path: object = None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != TARGET:
            return None
        real_spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            real_spec = finder.find_spec(fullname, path, target)
            if real_spec is not None:
                break
        if real_spec is None:
            return importlib.machinery.ModuleSpec(
                TARGET, _GuardedLoader(None), is_package=True
            )
        real_spec.loader = _GuardedLoader(real_spec.loader)
        return real_spec


def install() -> None:
    if os.environ.get(FALLBACK_ENV, "") in ("1", "true", "True"):
        return
    if not any(isinstance(f, SglKernelFallbackFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, SglKernelFallbackFinder())


install()
