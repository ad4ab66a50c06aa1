"""Upstream's hybrid SWA allocator with both sub-allocators segmented.

Upstream's own logic is kept whole: the full-to-SWA index translation, the SWA frees of
out-of-window KV (`free_swa`), free groups. Only the two sub-allocators it drives are
replaced, each over its own sub-pool's segments, so a slot the SWA radix cache evicts
goes back to its segment and a trailing SWA segment left empty is given back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from sglang.srt.mem_cache.allocator.swa import SWATokenToKVPoolAllocator
from sglang.srt.mem_cache.segmented.kv_allocators import (
    SegmentedAllocator,
    segmented_allocator_for,
)

if TYPE_CHECKING:
    from sglang.srt.mem_cache.base_prefix_cache import BasePrefixCache
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
    from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool


class SegmentedSWATokenToKVPoolAllocator(SWATokenToKVPoolAllocator):
    """`SWATokenToKVPoolAllocator` over two segmented sub-allocators (module docstring)."""

    full_attn_allocator: SegmentedAllocator
    swa_attn_allocator: SegmentedAllocator

    def __init__(
        self,
        size: int,
        size_swa: int,
        page_size: int,
        dtype: torch.dtype,
        device: str,
        kvcache: SWAKVPool,
        need_sort: bool,
        req_to_token_pool: ReqToTokenPool | None = None,
    ) -> None:
        super().__init__(
            size,
            size_swa,
            page_size,
            dtype,
            device,
            kvcache,
            need_sort,
            req_to_token_pool,
        )
        self.full_attn_allocator = segmented_allocator_for(
            size, page_size, dtype, device, kvcache.full_kv_pool, need_sort
        )
        self.swa_attn_allocator = segmented_allocator_for(
            size_swa, page_size, dtype, device, kvcache.swa_kv_pool, need_sort
        )
        self.clear()

    @property
    def _parts(self) -> tuple[SegmentedAllocator, SegmentedAllocator]:
        return self.full_attn_allocator, self.swa_attn_allocator

    def scheduler_step(self, demand_tokens: int) -> None:
        # Every new token takes a slot on both sides (the SWA side frees out-of-window ones).
        for part in self._parts:
            part.scheduler_step(demand_tokens)

    def note_busy(self) -> None:
        for part in self._parts:
            part.note_busy()

    def idle_step(self, tree_cache: BasePrefixCache) -> bool:
        ran = self.full_attn_allocator.idle_step(tree_cache)
        if ran:
            # Whatever the full side's eviction freed on the SWA side goes back too.
            self.swa_attn_allocator.maybe_shrink_now()
        return ran

    def withheld_size(self) -> int:
        return self.full_attn_allocator.withheld_size()

    def swa_withheld_size(self) -> int:
        return self.swa_attn_allocator.withheld_size()

    def maybe_shrink(self, keep_free_tokens: int = 0) -> int:
        return sum(part.maybe_shrink(keep_free_tokens) for part in self._parts)

    def maybe_shrink_now(self) -> int:
        return sum(part.maybe_shrink_now() for part in self._parts)

    def release_cache_above_retained(
        self, tree_cache: BasePrefixCache, why: str
    ) -> int:
        return sum(
            part.release_cache_above_retained(tree_cache, why) for part in self._parts
        )

    def suspend(self) -> int:
        return sum(part.suspend() for part in self._parts)

    def resume(self) -> None:
        for part in self._parts:
            part.resume()

    def verify_byte_accounting(self) -> list[str]:
        return [
            f"{name}: {problem}"
            for name, part in zip(("full", "swa"), self._parts, strict=True)
            for problem in part.verify_byte_accounting()
        ]

    @property
    def mid_batch_commits(self) -> int:
        return sum(part.mid_batch_commits for part in self._parts)

    def segment_stats(self) -> dict[str, Any]:
        """The two sub-pools summed (bytes, segments, counters), and each one by name."""
        full, swa = (part.segment_stats() for part in self._parts)
        out: dict[str, Any] = {}
        for key, value in full.items():
            # Settings, and the full pool's tokens (what bounds a request), are not summed.
            if key in (
                "segment_tokens",
                "hold_off_s",
                "used_tokens",
                "withheld_tokens",
            ):
                out[key] = value
            else:
                out[key] = value + swa[key]
        out["pools"] = {"full": full, "swa": swa}
        return out
