"""The idle policy in-process: eviction by location in upstream's prefix caches, then release.

Both caches upstream 0.5.23 has are driven the way the scheduler drives them (match, allocate
the rest, insert), over the segmented allocators, until the cache spans many segments."""

from __future__ import annotations

import mmap
import random
import types
from array import array

import pytest
import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey
from sglang.srt.mem_cache.segmented import kv_allocators
from sglang.srt.mem_cache.segmented.buffers import SegmentedBuffers
from sglang.srt.mem_cache.segmented.cpu_backing import CpuBackingFactory
from sglang.srt.mem_cache.segmented.geometry import SegmentGeometry
from sglang.srt.mem_cache.segmented.runtime import RUNTIME
from sglang.srt.mem_cache.unified_cache.components import ComponentType
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

SIZE = 4096
SEGMENT = 256
RETAIN = 512


def _allocator(page_size: int):
    geometry = SegmentGeometry(SIZE + page_size, SEGMENT, page_size)
    row = mmap.PAGESIZE // 64  # 256 tokens x 64 B: every segment spans whole OS pages
    kv = types.SimpleNamespace(
        segmented_buffers=SegmentedBuffers.create(geometry, [row, row], CpuBackingFactory())
    )
    if page_size == 1:
        return kv_allocators.SegmentedTokenToKVPoolAllocator(SIZE, torch.float32, "cpu", kv, False)
    return kv_allocators.SegmentedPagedTokenToKVPoolAllocator(
        SIZE, page_size, torch.float32, "cpu", kv, False
    )


def _cache(kind: str, allocator, page_size: int):
    params = dict(
        disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=allocator,
        page_size=page_size,
    )  # fmt: skip
    if kind == "radix":
        return RadixCache(CacheInitParams(**params))
    return UnifiedRadixCache(
        CacheInitParams(**params, tree_components=(ComponentType.FULL,), tree_core_backend=kind)
    )


def _fill(cache, allocator, locked_at: int | None = None) -> tuple[list[RadixKey], object]:
    """Requests with shared prefixes; returns their keys and (optionally) a locked node."""
    unified = isinstance(cache, UnifiedRadixCache)
    rng = random.Random(5)
    prefixes = [[rng.randrange(3, 2000) for _ in range(320)] for _ in range(4)]
    keys: list[RadixKey] = []
    locked = None
    for i in range(60):
        tokens = prefixes[i % 4] + [
            rng.randrange(3, 2000) for _ in range(rng.randrange(1, 13) * 16)
        ]
        key = RadixKey(array("q", tokens))
        keys.append(key)
        match = cache.match_prefix(MatchPrefixParams(key=key))
        hit = match.device_prefix_len
        if hit:
            node = match.last_device_node
            if unified:
                path = cache.tree_core.collect_path_info([node])[0]
                prefix = cache.tree_core.collect_full_device_indices(node, path[0].parent_id)
            else:
                prefix = cache.path_device_indices(node)
            prefix = prefix[:hit].to(torch.int64)
        else:
            prefix = torch.empty(0, dtype=torch.int64)
        need = len(tokens) - hit
        new = allocator.alloc(need)
        if new is None:
            cache.evict(EvictParams(num_tokens=need))
            new = allocator.alloc(need)
        assert new is not None
        value = torch.cat([prefix, new.to(torch.int64)])
        if unified:
            inserted = cache.insert(InsertParams(key=key, value=value, prev_prefix_len=hit))
        else:
            inserted = cache.insert(InsertParams(key=key, value=value))
            if inserted.prefix_len > hit:
                allocator.free(value[hit : inserted.prefix_len])
        if i == locked_at:
            node = inserted.last_device_node
            locked = (node, cache.inc_lock_ref(node))
    return keys, locked


def _cached_slots(cache) -> torch.Tensor:
    if isinstance(cache, UnifiedRadixCache):
        return cache.tree_core.all_values_flatten()
    out, stack = [], list(cache.root_node.children.values())
    while stack:
        node = stack.pop()
        stack.extend(node.children.values())
        out.append(node.value)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


@pytest.mark.parametrize("kind", ["rust", "python", "radix"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_idle_policy_evicts_trailing_segments_and_releases_them(
    kind: str, page_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(RUNTIME.settings, "hold_off_s", 0.0)
    monkeypatch.setattr(RUNTIME.settings, "idle_cache_tokens", RETAIN)
    allocator = _allocator(page_size)
    cache = _cache(kind, allocator, page_size)
    keys, _ = _fill(cache, allocator)
    seg = allocator._segments
    assert seg.committed_segments > 8  # the cache spans many segments
    assert cache.evictable_size() > 4 * RETAIN
    hits_before = [cache.match_prefix(MatchPrefixParams(key=k)).device_prefix_len for k in keys]

    allocator._iteration = 0  # on the sync cadence
    allocator.idle_step(cache)

    keep = seg.segments_holding(-(-RETAIN // page_size))
    boundary = seg.first_page_of(keep) * page_size
    slots = _cached_slots(cache)
    assert int(slots.max()) < boundary  # nothing cached at or above the retained segments
    assert cache.evictable_size() <= RETAIN
    # Every segment above the highest cached slot is given back.
    highest_segment = int(slots.max()) // page_size // seg.geometry.segment_pages
    assert seg.committed_segments == highest_segment + 1 <= keep
    row = mmap.PAGESIZE // 64
    assert allocator._buffers.committed_bytes == seg.committed_segments * SEGMENT * 2 * row
    # Upstream's idle identity holds and what is retained still hits, with the same slots.
    assert allocator.available_size() + cache.evictable_size() + cache.protected_size() == SIZE
    hits_after = [cache.match_prefix(MatchPrefixParams(key=k)).device_prefix_len for k in keys]
    assert all(a <= b for a, b in zip(hits_after, hits_before, strict=True))
    assert sum(hits_after) > 0
    seg.check_invariants()
    # Once per idle period: a second idle iteration does nothing more.
    allocator._iteration = 0
    before = cache.evictable_size()
    allocator.idle_step(cache)
    assert cache.evictable_size() == before


def test_referenced_cache_is_never_evicted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(RUNTIME.settings, "hold_off_s", 0.0)
    monkeypatch.setattr(RUNTIME.settings, "idle_cache_tokens", 0)
    allocator = _allocator(1)
    cache = _cache("rust", allocator, 1)
    keys, locked = _fill(cache, allocator, locked_at=58)
    assert locked is not None
    protected = cache.protected_size()
    assert protected > 0
    allocator._iteration = 0
    allocator.idle_step(cache)
    assert cache.protected_size() == protected
    assert cache.evictable_size() == 0
    # The locked request's slots are still in the tree, so its segments stay committed.
    assert cache.match_prefix(MatchPrefixParams(key=keys[58])).device_prefix_len == len(keys[58])
    cache.dec_lock_ref(*locked)
    cache.evict(EvictParams(num_tokens=SIZE))
    assert allocator.available_size() == SIZE


def test_idle_policy_waits_for_the_hold_off_and_inf_disables_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(RUNTIME.settings, "hold_off_s", 3600.0)
    allocator = _allocator(1)
    cache = _cache("rust", allocator, 1)
    _fill(cache, allocator)
    evictable = cache.evictable_size()
    allocator._iteration = 0
    allocator.idle_step(cache)  # busy a moment ago: not due
    assert cache.evictable_size() == evictable
    allocator._segments.hold_off_s = float("inf")
    allocator._busy_at -= 1e9
    allocator.idle_step(cache)
    assert cache.evictable_size() == evictable
