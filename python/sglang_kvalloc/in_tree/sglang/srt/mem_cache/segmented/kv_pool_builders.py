"""The KV pools and allocators of segmented mode, built where upstream builds its own:
the segment-committed subclass of the pool class upstream chose, and the segment-aware
counterpart of its allocator."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sglang.srt.mem_cache.segmented import modes
from sglang.srt.mem_cache.segmented.runtime import builds_kv_on_demand

if TYPE_CHECKING:
    from sglang.srt.mem_cache.allocator.base import BaseTokenToKVPoolAllocator
    from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator
    from sglang.srt.mem_cache.memory_pool import KVCache


def _unforeseen_pool(what: str) -> modes.KvAllocModeError:
    """Upstream is building a pool the decision did not foresee
    (`pool_kind.kv_pool_kind` asks upstream's own choosers): a start-up error rather
    than a pool run the wrong way."""
    return modes.KvAllocModeError(
        f"--kv-alloc-mode segmented: upstream builds {what}, which the mode decision did not "
        "foresee; use --kv-alloc-mode static (and report this)"
    )


def segmented_mha_pool_class(
    self: KVCacheConfigurator, *args: Any, **kwargs: Any
) -> type[KVCache]:
    """Called first in `_build_mha_kv_pool`, for its `mha_pool_class`: the segmented MHA
    pool class in segmented mode (upstream's choice otherwise)."""
    pool_class = kwargs.get("mha_pool_class")
    if not builds_kv_on_demand(self):
        return pool_class
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.mem_cache.segmented.kv_pools import SegmentedMHATokenToKVPool

    if pool_class is not MHATokenToKVPool or kwargs.get("quant_method") is not None:
        name = getattr(pool_class, "__name__", "?")
        quantized = (
            " with a KV quantization method" if kwargs.get("quant_method") else ""
        )
        raise _unforeseen_pool(f"the {name} pool{quantized}")
    return SegmentedMHATokenToKVPool


def _segmented_class(
    chosen: type[KVCache], upstream_class: type[KVCache], segmented_class: type[KVCache]
) -> type[KVCache]:
    """The segmented subclass of the pool class upstream chose (its plain class, as the
    decision foresaw)."""
    if chosen is not upstream_class:
        raise _unforeseen_pool(f"the {getattr(chosen, '__name__', '?')} pool")
    return segmented_class


def segmented_swa_pool_class(
    self: KVCacheConfigurator, *args: Any, **kwargs: Any
) -> type[KVCache]:
    """Called first in `_build_hybrid_swa_kv_pool`, for its `mha_pool_class`: upstream's
    `SWAKVPool` with both sub-pools (full and sliding-window) segment-committed, in
    segmented mode."""
    pool_class = kwargs.get("mha_pool_class")
    if not builds_kv_on_demand(self):
        return pool_class
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.mem_cache.segmented.kv_pools import SegmentedMHATokenToKVPool

    return _segmented_class(pool_class, MHATokenToKVPool, SegmentedMHATokenToKVPool)


def segmented_mla_pool_class(
    self: KVCacheConfigurator, *args: Any, **kwargs: Any
) -> type[KVCache]:
    """Called first in `_build_mla_kv_pool`, for its `mla_pool_class`: the segmented MLA
    (latent cache) pool in segmented mode."""
    pool_class = kwargs.get("mla_pool_class")
    if not builds_kv_on_demand(self):
        return pool_class
    from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool
    from sglang.srt.mem_cache.segmented.kv_pools import SegmentedMLATokenToKVPool

    return _segmented_class(pool_class, MLATokenToKVPool, SegmentedMLATokenToKVPool)


def segment_aware_allocator(
    allocator: BaseTokenToKVPoolAllocator,
    self: KVCacheConfigurator,
    *args: Any,
    **kwargs: Any,
) -> BaseTokenToKVPoolAllocator:
    """Called where `_build_token_to_kv_pool_allocator` returns, with its result:
    segment-aware allocators over a segmented pool (upstream's token, paged or hybrid
    SWA allocator, each replaced by its counterpart)."""
    pool = kwargs.get("token_to_kv_pool")
    if not builds_kv_on_demand(self):
        return allocator
    from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
    from sglang.srt.mem_cache.allocator.swa import SWATokenToKVPoolAllocator
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.segmented.kv_allocators import segmented_allocator_for
    from sglang.srt.mem_cache.segmented.swa_allocator import (
        SegmentedSWATokenToKVPoolAllocator,
    )

    if type(allocator) is SWATokenToKVPoolAllocator:
        return SegmentedSWATokenToKVPoolAllocator(
            allocator.size_full,
            allocator.size_swa,
            allocator.page_size,
            allocator.dtype,
            allocator.device,
            pool,
            allocator.need_sort,
            kwargs.get("req_to_token_pool"),
        )
    if type(allocator) in (TokenToKVPoolAllocator, PagedTokenToKVPoolAllocator):
        return segmented_allocator_for(
            allocator.size,
            allocator.page_size,
            allocator.dtype,
            allocator.device,
            pool,
            allocator.need_sort,
        )
    raise modes.KvAllocModeError(
        "--kv-alloc-mode segmented supports upstream's token, paged and hybrid SWA "
        f"allocators only (got {type(allocator).__name__})"
    )
