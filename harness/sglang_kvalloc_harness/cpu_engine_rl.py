"""Upstream's RL memory release on SGLang's CPU engine: one CUDA-only call.

The test harness's (an `sglang.srt.plugins` entry point of `sglang-kvalloc-harness`), never
the product's. `SchedulerWeightUpdaterManager.release_memory_occupation` ends with
``torch.get_device_module().synchronize()``, which on a machine without CUDA answers
``torch.cuda`` and kills the scheduler in every mode ("Found no NVIDIA driver"). While
upstream's release and resume run, on the CPU engine only, ``torch.get_device_module()``
answers SGLang's own device module (upstream's `get_device_module`, ``torch.cpu``); CUDA is
left untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from sglang_kvalloc_harness.kernels.bootstrap import cpu_engine

if TYPE_CHECKING:
    from sglang.srt.managers.scheduler_components.weight_updater import (
        SchedulerWeightUpdaterManager,
    )

UPDATER = "sglang.srt.managers.scheduler_components.weight_updater.SchedulerWeightUpdaterManager"


@contextlib.contextmanager
def engine_device_module() -> Iterator[None]:
    """``torch.get_device_module()`` with no device answers SGLang's device module."""
    from sglang.srt.utils.common import get_device_module

    bare = torch.get_device_module

    def device_module(device: Any = None) -> Any:
        return get_device_module() if device is None else bare(device)

    torch.get_device_module = device_module
    try:
        yield
    finally:
        torch.get_device_module = bare


def around_memory_occupation(
    original: Callable[..., Any], updater: SchedulerWeightUpdaterManager, *args: Any, **kwargs: Any
) -> Any:
    """AROUND `release_memory_occupation` and `resume_memory_occupation`: upstream's call,
    under SGLang's device module on the CPU engine."""
    if not cpu_engine():
        return original(updater, *args, **kwargs)
    with engine_device_module():
        return original(updater, *args, **kwargs)


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    for name in ("release_memory_occupation", "resume_memory_occupation"):
        HookRegistry.register(f"{UPDATER}.{name}", around_memory_occupation, HookType.AROUND)
