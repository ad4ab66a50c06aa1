"""Segment-aware allocators inside upstream's own classic RadixCache (in-process, CPU)."""

from __future__ import annotations

import random
import types
from array import array

import pytest
import torch
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey
from sglang.srt.mem_cache.segmented import kv_allocators
from sglang.srt.mem_cache.segmented.buffers import SegmentedBuffers
from sglang.srt.mem_cache.segmented.cpu_backing import CpuBackingFactory
from sglang.srt.mem_cache.segmented.geometry import SegmentGeometry
from sglang.srt.mem_cache.segmented.runtime import RUNTIME

SIZE = 4096
SEGMENT = 256


def _segmented_allocator(page_size: int, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(RUNTIME.settings, "hold_off_s", 0.0)
    geometry = SegmentGeometry(SIZE + page_size, SEGMENT, page_size)
    buffers = SegmentedBuffers.create(geometry, [64, 64], CpuBackingFactory())
    kvcache = types.SimpleNamespace(segmented_buffers=buffers)
    if page_size == 1:
        return kv_allocators.SegmentedTokenToKVPoolAllocator(
            SIZE, torch.float32, "cpu", kvcache, False
        )
    return kv_allocators.SegmentedPagedTokenToKVPoolAllocator(
        SIZE, page_size, torch.float32, "cpu", kvcache, False
    )


def _static_allocator(page_size: int):
    if page_size == 1:
        return TokenToKVPoolAllocator(SIZE, torch.float32, "cpu", None, False)
    return PagedTokenToKVPoolAllocator(SIZE, page_size, torch.float32, "cpu", None, False)


def _shared_prefix_workload(allocator, page_size: int) -> tuple[list[int], RadixCache]:
    """What the scheduler does per request: match, allocate the rest, insert, free dupes."""
    cache = RadixCache(
        CacheInitParams(
            disable=False,
            req_to_token_pool=None,
            token_to_kv_pool_allocator=allocator,
            page_size=page_size,
        )
    )
    rng = random.Random(3)
    prefixes = [[rng.randrange(3, 2000) for _ in range(320)] for _ in range(4)]
    hits = []
    for i in range(80):
        suffix = [rng.randrange(3, 2000) for _ in range(rng.randrange(1, 13) * 16)]
        tokens = prefixes[i % 4] + suffix
        key = RadixKey(array("q", tokens))
        match = cache.match_prefix(MatchPrefixParams(key=key))
        hit = match.device_prefix_len
        hits.append(hit)
        prefix = cache.path_device_indices(match.last_device_node)[:hit]
        need = len(tokens) - hit
        new = allocator.alloc(need)
        if new is None:
            cache.evict(EvictParams(num_tokens=need))
            new = allocator.alloc(need)
        assert new is not None
        value = torch.cat([prefix.to(torch.int64), new.to(torch.int64)])
        inserted = cache.insert(InsertParams(key=key, value=value))
        if inserted.prefix_len > hit:
            allocator.free(value[hit : inserted.prefix_len])
    return hits, cache


@pytest.mark.parametrize("page_size", [1, 16])
def test_classic_radix_cache_hits_equal_static_and_slots_return(
    page_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    static_hits, _ = _shared_prefix_workload(_static_allocator(page_size), page_size)
    allocator = _segmented_allocator(page_size, monkeypatch)
    hits, cache = _shared_prefix_workload(allocator, page_size)
    assert hits == static_hits
    assert sum(hits) > 0
    seg = allocator._segments
    assert seg.peak_committed_segments > 1  # the workload grew the pool
    seg.check_invariants()
    # Evicting everything gives every slot back: the idle leak identity holds ...
    cache.evict(EvictParams(num_tokens=SIZE))
    assert cache.evictable_size() == 0
    assert allocator.available_size() == SIZE
    # ... and the emptied trailing segments are released.
    allocator.maybe_shrink()
    assert seg.committed_segments == 1
    assert allocator._buffers.committed_bytes == allocator._buffers.byte_range(0, 0)[1] * 2
