"""Make `sgl_kernel` importable on SGLang's CPU engine, where its CUDA build cannot load.

The test harness's, never the product's: imported from `sglang_kvalloc_harness_bootstrap.pth`
at interpreter start, in every process (scheduler and detokenizer processes are spawned and
import upstream's memory pool, which imports `sgl_kernel` at module level, before any plugin
has run). A production install (`sglang-kvalloc` alone) has no such hook.

It costs nothing until something imports `sgl_kernel`. Then the real package is executed
first; only if that raises ImportError/OSError (no libcuda, no CPU build on the index) AND the
process runs the CPU engine (``SGLANG_USE_CPU_ENGINE=1``, upstream's switch, or no CUDA device
torch can see) is the module filled with the pure-torch fallbacks from `sgl_kernel_cpu`, with a
WARNING. On a CUDA machine a broken `sgl_kernel` fails as upstream fails.

Set SGLANG_KVALLOC_DISABLE_KERNEL_FALLBACK=1 to turn this off.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import sys
import types

from sglang_kvalloc.in_tree_finder import real_spec

FALLBACK_ENV = "SGLANG_KVALLOC_DISABLE_KERNEL_FALLBACK"
TARGET = "sgl_kernel"

logger = logging.getLogger(__name__)


def cpu_engine() -> bool:
    """Whether this process runs SGLang's CPU engine: upstream's switch
    (``SGLANG_USE_CPU_ENGINE=1``, as `sglang.srt.platforms` reads it), or no CUDA device."""
    if os.getenv("SGLANG_USE_CPU_ENGINE", "0") == "1":
        return True
    import torch

    return not torch.cuda.is_available()


class _GuardedLoader(importlib.abc.Loader):
    """Runs the real loader; on failure, on the CPU engine only, turns the module into the
    CPU fallback."""

    def __init__(self, real_loader: importlib.abc.Loader | None) -> None:
        self._real = real_loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        if self._real is not None and hasattr(self._real, "create_module"):
            return self._real.create_module(spec)
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        before = set(sys.modules)
        if self._real is None:
            if not cpu_engine():
                raise ModuleNotFoundError(f"No module named {TARGET!r}", name=TARGET)
            reason = "the package is not installed"
        else:
            try:
                self._real.exec_module(module)
                return
            except (ImportError, OSError) as exc:  # no libcuda.so.1, no CPU build
                if not cpu_engine():
                    raise
                reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1]}"
        # Drop submodules the failed attempt left behind; they hold half-loaded state.
        for name in set(sys.modules) - before:
            if name.startswith(TARGET + "."):
                del sys.modules[name]
        from sglang_kvalloc_harness.kernels import sgl_kernel_cpu

        sgl_kernel_cpu.populate(module, reason)
        logger.warning(
            "sgl_kernel could not load (%s): the CPU engine runs sglang-kvalloc's pure-torch "
            "fallback kernels (test harness; %s=1 turns it off).",
            reason,
            FALLBACK_ENV,
        )


class KernelFallback(importlib.abc.MetaPathFinder):
    """Wraps the real loader of `sgl_kernel` (see the module docstring)."""

    def find_spec(
        self,
        fullname: str,
        path: object = None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != TARGET or os.environ.get(FALLBACK_ENV, "") in ("1", "true", "True"):
            return None
        spec = real_spec(self, fullname, path, target)
        if spec is None:
            return importlib.machinery.ModuleSpec(TARGET, _GuardedLoader(None), is_package=True)
        spec.loader = _GuardedLoader(spec.loader)
        return spec


def install() -> None:
    if not any(isinstance(f, KernelFallback) for f in sys.meta_path):
        sys.meta_path.insert(0, KernelFallback())


install()
