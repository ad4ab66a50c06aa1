"""``sgl_kernel.utils`` stand-in: ``is_arch_support_pdl`` as sglang-kernel 0.4.10 defines it
(upstream's triton attention backend asks it whether to launch with PDL); other names raise."""

from __future__ import annotations

import functools

import torch

from ._missing import missing_getattr


@functools.cache
def is_arch_support_pdl() -> bool:
    """Programmatic dependent launch: CUDA devices of compute capability 9.0 and later."""
    if getattr(torch.version, "hip", None) or getattr(torch.version, "musa", None):
        return False
    try:
        major, _ = torch.cuda.get_device_capability(torch.cuda.current_device())
    except Exception:  # noqa: BLE001 - no device: no PDL, as upstream's
        return False
    return major >= 9


__getattr__ = missing_getattr("utils")
