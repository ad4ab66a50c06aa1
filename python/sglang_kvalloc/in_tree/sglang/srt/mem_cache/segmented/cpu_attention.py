"""The CPU engine's attention (`TorchNativeAttnBackend`) over a segmented hybrid SWA
pool.

0.5.23's torch_native backend writes sliding-window KV at the full-to-SWA translated
slots but reads it back with the *full* pool's slot ids (`k_cache[req_to_token[row,
:seq_len]]` on the SWA sub-pool's buffer). That is only right while the full and SWA
allocators happen to hand out the same ids, which upstream's FIFO free lists keep true
on a fresh server; any other legal order, such as the segmented allocator's
lowest-slot-first (which lets high segments drain), reads another token's KV. Measured
on the tiny Mellum model: static with upstream's own token allocator made lowest-first
gives wrong greedy tokens too.

In segmented mode on a hybrid SWA pool the read goes through upstream's own mapping
(`full_to_swa_index_mapping`) instead: a small table of the batch's rows, translated, in
place of `req_to_token`. Static keeps upstream's behaviour.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from sglang.srt.mem_cache.segmented.runtime import RUNTIME

if TYPE_CHECKING:
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend


def _reads_swa_sub_pool(backend: TorchNativeAttnBackend, k_cache: torch.Tensor) -> bool:
    if not getattr(backend, "use_sliding_window_kv_pool", False):
        return False
    if not RUNTIME.decision.kv_on_demand:
        return False
    pool = backend.token_to_kv_pool
    ptrs = getattr(backend, "_kvalloc_swa_ptrs", None)
    if ptrs is None:
        ptrs = frozenset(b.data_ptr() for b in pool.swa_kv_pool.k_buffer)
        backend._kvalloc_swa_ptrs = ptrs
    return k_cache.data_ptr() in ptrs


def _translated_rows(
    backend: TorchNativeAttnBackend,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's rows of req_to_token as SWA sub-pool slot ids, and their new row indices."""
    longest = int(seq_lens.max()) if seq_lens.numel() else 0
    rows = req_to_token[req_pool_indices.long(), :longest].long()
    mapping = backend.token_to_kv_pool.full_to_swa_index_mapping
    return mapping[rows], torch.arange(rows.shape[0], device=rows.device)


def swa_sub_pool_rows(
    backend: TorchNativeAttnBackend,
    query: torch.Tensor,
    output: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    *args: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Called first in `TorchNativeAttnBackend._run_sdpa_forward_extend` and
    `_run_sdpa_forward_decode` (arguments `req_to_token`, `req_pool_indices`): where the
    layer reads a segmented SWA sub-pool, the batch's rows as that sub-pool's slot ids
    (upstream's full-to-SWA mapping); the caller's tables otherwise."""
    if _reads_swa_sub_pool(backend, k_cache):
        return _translated_rows(backend, req_to_token, req_pool_indices, seq_lens)
    return req_to_token, req_pool_indices


SDPA_ROWS = ("req_to_token", "req_pool_indices")
