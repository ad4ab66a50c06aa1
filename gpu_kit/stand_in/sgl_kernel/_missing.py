"""Module-level ``__getattr__`` for the stand-in's submodules: any name is a MissingKernel."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sglang_kvalloc_harness.kernels.sgl_kernel_cpu import MissingKernel

REASON = "sglang-kvalloc GPU kit stand-in: sglang-kernel's CUDA build cannot travel"
RESOLVED: list[str] = []  # "submodule.name" of every missing op upstream bound


def missing_getattr(module_name: str) -> Callable[[str], Any]:
    """A PEP 562 ``__getattr__`` giving a MissingKernel named ``module_name.<name>``."""

    def __getattr__(name: str) -> Any:  # noqa: N807 - module-level __getattr__
        if name.startswith("__"):
            raise AttributeError(name)
        RESOLVED.append(f"{module_name}.{name}")
        return MissingKernel(f"{module_name}.{name}", REASON)

    return __getattr__
