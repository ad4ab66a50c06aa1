"""The choice of backing: which reservations segmented mode makes on the device in use.

An anonymous `mmap` on the CPU (`CpuBackingFactory`), the CUDA driver's virtual memory
API on an NVIDIA GPU (`CudaBackingFactory`, after checking the device, the driver and
upstream's settings); any other device cannot run segmented mode, said in one line. The
factory is made once per process and kept on `RUNTIME.backings`.
"""

from __future__ import annotations

import importlib
import logging
import os

import torch

from sglang.srt.mem_cache.segmented import modes
from sglang.srt.mem_cache.segmented.backing import (
    BackingFactory,
    BackingUnavailableError,
)
from sglang.srt.mem_cache.segmented.cpu_backing import CpuBackingFactory
from sglang.srt.mem_cache.segmented.runtime import RUNTIME

logger = logging.getLogger(__name__)

# CI only: "module:callable" returning a `VmmApi` (the fake driver), so the CPU engine serves
# over the CUDA VMM backing and every GPU code path (test/e2e).
TEST_VMM_API_ENV = "SGLANG_KVALLOC_TEST_VMM_API"


def open_backings(device: str) -> BackingFactory:
    """Make (once) and install the backing factory of ``device``: the CPU mmap one, or
    the CUDA VMM one, which checks the device, the driver and the environment first.

    Raises:
        KvAllocModeError: the device cannot back segmented mode (one line for the user).
    """
    if os.environ.get(TEST_VMM_API_ENV) and device.startswith("cpu"):
        return _test_vmm_backings(os.environ[TEST_VMM_API_ENV])
    if device.startswith("cpu"):
        if not isinstance(RUNTIME.backings, CpuBackingFactory):
            RUNTIME.backings = CpuBackingFactory()
        return RUNTIME.backings
    if not device.startswith("cuda"):
        raise modes.KvAllocModeError(
            f"--kv-alloc-mode segmented has no backing for device {device!r} (cpu and cuda "
            "have one); use --kv-alloc-mode static"
        )
    from sglang.srt.environ import envs

    if envs.SGLANG_ENABLE_POST_CAPTURE_KV_SIZING.get():
        raise modes.KvAllocModeError(
            "--kv-alloc-mode segmented sizes the KV pool itself: unset "
            "SGLANG_ENABLE_POST_CAPTURE_KV_SIZING, or use --kv-alloc-mode static"
        )
    # The CUDA backing comes with a later PR of the upstream series (series.py).
    from sglang.srt.mem_cache.segmented.cuda_backing import (
        CudaBackingFactory,
        VmmDevice,
    )
    from sglang.srt.mem_cache.segmented.cuda_vmm import UpstreamVmmApi

    if isinstance(RUNTIME.backings, CudaBackingFactory):
        return RUNTIME.backings
    device_id = torch.cuda.current_device()
    try:
        api = UpstreamVmmApi(device_id)
        factory = CudaBackingFactory(VmmDevice.get(api, device_id))
    except BackingUnavailableError as exc:
        raise modes.KvAllocModeError(
            f"--kv-alloc-mode segmented cannot run on {device}: {exc}; use --kv-alloc-mode static"
        ) from None
    RUNTIME.backings = factory
    logger.info(
        "Segmented mode on %s: CUDA virtual memory, granularity %d MiB, uncommitted ranges "
        "mapped to a zero-filled scratch granule.",
        device,
        factory.granularity >> 20,
    )
    return factory


def _test_vmm_backings(spec: str) -> BackingFactory:
    """The CUDA VMM backing over the `VmmApi` that ``spec`` ("module:callable") makes:
    the CPU engine then runs the GPU paths (explicit commits, fixed RoPE, fences)."""
    from sglang.srt.mem_cache.segmented.cuda_backing import (
        CudaBackingFactory,
        VmmDevice,
    )

    if isinstance(RUNTIME.backings, CudaBackingFactory):
        return RUNTIME.backings
    module, _, name = spec.partition(":")
    api = getattr(importlib.import_module(module), name)()
    RUNTIME.backings = CudaBackingFactory(VmmDevice.get(api, 0))
    logger.warning(
        "%s=%s: the CUDA VMM backing runs over a test driver.", TEST_VMM_API_ENV, spec
    )
    return RUNTIME.backings
