"""Upstream's MHA and MLA KV pools with their buffers on reserved, segment-committed
memory.

Slot ids never move: each buffer is one contiguous tensor over a reservation
(`RUNTIME.backings` makes it), so the radix cache, req_to_token and every attention
kernel work unchanged. The pools only place the buffers; the allocators
(`allocators.py`) commit and release segments.
"""

from __future__ import annotations

import logging
import math

from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool
from sglang.srt.mem_cache.segmented import geometry as segment_geometry
from sglang.srt.mem_cache.segmented.buffers import SegmentedBuffers
from sglang.srt.mem_cache.segmented.geometry import SegmentGeometry
from sglang.srt.mem_cache.segmented.runtime import RUNTIME

logger = logging.getLogger(__name__)


def choose_segment_tokens(
    requested: int | None,
    cap_tokens: int,
    page_size: int,
    row_bytes: list[int],
    gran: int,
) -> int:
    """`geometry.choose_segment_tokens`, with what the operator should know logged."""
    choice = segment_geometry.choose_segment_tokens(
        requested, cap_tokens, page_size, row_bytes, gran
    )
    if choice.note is not None:
        logger.warning(choice.note)
    return choice.tokens


def segment_pool_buffers(
    page_size: int, row_bytes: list[int], cap_tokens: int, kind: str
) -> SegmentedBuffers:
    """Reserve one segment-committed buffer per entry of ``row_bytes`` (bytes per token
    slot) for a pool of ``cap_tokens`` slots (slot 0's page included), and log what was
    reserved."""
    backings = RUNTIME.backings
    seg_tokens = choose_segment_tokens(
        RUNTIME.settings.segment_tokens,
        cap_tokens,
        page_size,
        row_bytes,
        backings.granularity,
    )
    geometry = SegmentGeometry(cap_tokens, seg_tokens, page_size)
    buffers = SegmentedBuffers.create(geometry, row_bytes, backings=backings)
    RUNTIME.kv_buffers.append(buffers)
    logger.info(
        "Segmented %s KV pool: %d tokens reserved (%.3f GB address space) in %d segments of %d "
        "tokens (%.2f MB each); committed now: %.2f MB.",
        kind,
        cap_tokens - page_size,
        sum(b.reserved_bytes for b in buffers.backings) / 1e9,
        geometry.num_segments,
        seg_tokens,
        seg_tokens * sum(row_bytes) / 1e6,
        buffers.committed_bytes / 1e6,
    )
    return buffers


class SegmentedMHATokenToKVPool(MHATokenToKVPool):
    """MHA KV pool whose per-layer K and V buffers sit on reserved, segment-committed
    memory. Also each sub-pool (full and sliding-window) of upstream's hybrid
    `SWAKVPool`."""

    segmented_buffers: SegmentedBuffers

    def _create_buffers_normal(self) -> None:
        layout = getattr(self, "kv_cache_layout", "nhd")
        if layout != "nhd" or getattr(self, "use_hnd", False):
            raise ValueError(
                f"--kv-alloc-mode segmented supports the NHD KV layout only (got {layout!r})"
            )
        k_shape, v_shape = self._kv_buffer_shapes()
        itemsize = self.store_dtype.itemsize
        k_row = int(math.prod(k_shape[1:])) * itemsize
        v_row = int(math.prod(v_shape[1:])) * itemsize
        row_bytes = [k_row] * self.layer_num + [v_row] * self.layer_num
        label = getattr(self, "allocation_label", None)
        kind = f"MHA ({label})" if label and label != "KV" else "MHA"
        # size + page_size rows: slot 0's page is padding
        self.segmented_buffers = segment_pool_buffers(
            self.page_size, row_bytes, k_shape[0], kind
        )
        backings = self.segmented_buffers.backings
        self.k_buffer = [
            backings[i].tensor(self.store_dtype, tuple(k_shape))
            for i in range(self.layer_num)
        ]
        self.v_buffer = [
            backings[self.layer_num + i].tensor(self.store_dtype, tuple(v_shape))
            for i in range(self.layer_num)
        ]


class SegmentedMLATokenToKVPool(MLATokenToKVPool):
    """MLA (DeepSeek) KV pool: each layer's latent buffer (kv_lora_rank +
    qk_rope_head_dim per token) on reserved, segment-committed memory."""

    segmented_buffers: SegmentedBuffers

    def _create_buffers(self) -> None:
        if getattr(self, "custom_mem_pool", None) is not None:
            raise ValueError(
                "--kv-alloc-mode segmented cannot place the MLA pool in a custom memory pool"
            )
        shape = (self.size + self.page_size, 1, self.kv_cache_dim)
        row_bytes = [self.kv_cache_dim * self.store_dtype.itemsize] * self.layer_num
        self.segmented_buffers = segment_pool_buffers(
            self.page_size, row_bytes, shape[0], "MLA"
        )
        self.kv_buffer = [
            backing.tensor(self.store_dtype, shape)
            for backing in self.segmented_buffers.backings
        ]
