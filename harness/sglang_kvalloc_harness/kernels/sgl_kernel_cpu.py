"""Pure-torch stand-ins for the `sgl_kernel` CPU ops that upstream imports at module level.

Only ops whose semantics are pinned down by upstream's own reference (the Triton kernel it
runs on GPUs) are implemented, and each is tested against that reference semantics. Every
other name resolves to a `MissingKernel` that raises a clear error naming itself when
called: importing succeeds, calling never silently computes something wrong.
"""

from __future__ import annotations

import ctypes
import logging
import types
from typing import Any

import torch

logger = logging.getLogger(__name__)


class MissingKernelError(NotImplementedError):
    """Raised when code calls an `sgl_kernel` op that has no CPU fallback."""


class MissingKernel:
    """Placeholder for an `sgl_kernel` op that is not available on this machine."""

    def __init__(self, name: str, reason: str) -> None:
        self.__name__ = name
        self._reason = reason

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise MissingKernelError(
            f"sgl_kernel.{self.__name__} is not available: the sgl_kernel package could not "
            f"load ({self._reason}) and sglang-kvalloc has no CPU fallback for this op."
        )

    def __repr__(self) -> str:
        return f"<MissingKernel sgl_kernel.{self.__name__}>"


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """req_to_token[req_pool_indices[i], start[i]:end[i]] = the i-th run of out_cache_loc.

    Mirrors upstream's Triton `assign_req_to_token_pool` (mem_cache/allocation.py): runs of
    out_cache_loc are laid end to end in batch order.
    """
    del pool_len  # row length is req_to_token.shape[1]; kept for signature parity
    starts = start_offset.tolist()
    ends = end_offset.tolist()
    rows = req_pool_indices.tolist()
    offset = 0
    for row, start, end in zip(rows, starts, ends, strict=True):
        n = end - start
        if n > 0:
            req_to_token[row, start:end] = out_cache_loc[offset : offset + n].to(req_to_token.dtype)
        offset += n


def _byte_rows(ptr: int, stride: int, n_rows: int) -> torch.Tensor:
    """A (n_rows, stride) uint8 view of memory at `ptr` (memory owned by a live tensor)."""
    buf = (ctypes.c_uint8 * (stride * n_rows)).from_address(ptr)
    return torch.frombuffer(buf, dtype=torch.uint8).view(n_rows, stride)


def copy_all_layer_kv_cache_cpu(
    data_ptrs: torch.Tensor,
    strides: torch.Tensor,
    tgt_loc: torch.Tensor,
    src_loc: torch.Tensor,
) -> None:
    """For every buffer b: row tgt_loc[j] of b takes row src_loc[j]'s bytes (all j at once).

    Mirrors upstream's Triton `copy_all_layer_kv_cache_tiled` (kernels/ops/kvcache/
    cache_move.py): `data_ptrs[b]` is a buffer's base address, `strides[b]` its row size in
    bytes; all sources are read before any target is written, so in-place moves are safe.
    """
    if tgt_loc.numel() == 0:
        return
    src = src_loc.to(torch.int64)
    tgt = tgt_loc.to(torch.int64)
    n_rows = int(torch.maximum(src.max(), tgt.max()).item()) + 1
    for ptr, stride in zip(data_ptrs.tolist(), strides.tolist(), strict=True):
        rows = _byte_rows(int(ptr), int(stride), n_rows)
        rows[tgt] = rows[src].clone()


IMPLEMENTED = {
    "assign_req_to_token_pool_cpu": assign_req_to_token_pool_cpu,
    "copy_all_layer_kv_cache_cpu": copy_all_layer_kv_cache_cpu,
}


def populate(module: types.ModuleType, reason: str) -> None:
    """Turn a failed `sgl_kernel` import into the fallback module, in place."""
    keep = {"__name__", "__loader__", "__spec__", "__file__", "__builtins__"}
    for name in list(vars(module)):
        if name not in keep:
            delattr(module, name)
    module.__doc__ = f"sglang-kvalloc CPU fallback for sgl_kernel ({reason})"
    # No submodules: `import sgl_kernel.x` fails with ModuleNotFoundError, as upstream's
    # optional-import guards expect, instead of loading CUDA-only files.
    module.__path__ = []  # type: ignore[attr-defined]
    module.__version__ = "0.0.0+sglang-kvalloc-cpu-fallback"  # type: ignore[attr-defined]
    module.SGLANG_KVALLOC_FALLBACK_REASON = reason  # type: ignore[attr-defined]
    for name, fn in IMPLEMENTED.items():
        setattr(module, name, fn)

    def __getattr__(name: str) -> Any:  # noqa: N807 - module-level __getattr__ (PEP 562)
        if name.startswith("__"):
            raise AttributeError(name)
        return MissingKernel(name, reason)

    module.__getattr__ = __getattr__  # type: ignore[attr-defined]
    logger.debug("sgl_kernel fallback active: %s", reason)
