"""Eviction by location: drop unreferenced prefix-cache KV that lives at or above a slot
index.

Upstream evicts cached prefixes in LRU order, so one cached page in a high segment pins
that segment (and every one below it) committed. When the server is idle, segmented mode
first evicts every unreferenced cached node holding a slot at or above the retained
segments, then LRU down to the retained budget; the emptied trailing segments can then
be released.

Only leaves can be evicted (in both caches an internal node goes once its children
have):
- `UnifiedRadixCache` (the default in 0.5.23; Rust or Python tree core): walk the
  evictable leaves the way upstream's own `_evict_components` does, evicting only the
  qualifying ones. The walk helpers are private to 0.5.23, so without them this falls
  back to LRU eviction.
- classic `RadixCache`: its eviction strategy is a plain object; for one `evict()` call
  it is wrapped so qualifying leaves come first.
Locked (referenced) nodes are never touched: upstream's walks skip them.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sglang.srt.mem_cache.base_prefix_cache import BasePrefixCache
    from sglang.srt.mem_cache.evict_policy import EvictionStrategy
    from sglang.srt.mem_cache.radix_cache import RadixCache, TreeNode
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

logger = logging.getLogger(__name__)


def evict_at_or_above(cache: BasePrefixCache, boundary_slot: int) -> int:
    """Evict every unreferenced cached node whose path holds a KV slot >=
    ``boundary_slot`` (whole unreferenced subtrees under it, since only leaves can go).
    Returns tokens freed."""
    from sglang.srt.mem_cache.radix_cache import RadixCache
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

    if getattr(cache, "disable", False) or cache.evictable_size() == 0:
        return 0
    if isinstance(cache, UnifiedRadixCache):
        return _unified_evict_at_or_above(cache, boundary_slot)
    if isinstance(cache, RadixCache):
        return _radix_evict_at_or_above(cache, boundary_slot)
    logger.debug("eviction by location: %s not supported", type(cache).__name__)
    return 0


def evict_lru_down_to(cache: BasePrefixCache, keep_tokens: int) -> int:
    """Upstream's own eviction (LRU by default) until at most ``keep_tokens`` stay evictable."""
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    excess = cache.evictable_size() - keep_tokens
    if getattr(cache, "disable", False) or excess <= 0:
        return 0
    return int(cache.evict(EvictParams(num_tokens=excess)).num_tokens_evicted)


def _unified_evict_at_or_above(cache: UnifiedRadixCache, boundary_slot: int) -> int:
    from sglang.srt.mem_cache.unified_cache.components import ComponentType

    full = ComponentType.FULL
    core = cache.tree_core
    walk_helpers = (
        "_evict_device_next_node",
        "_evict_device_leaf",
        "update_eviction_metrics",
    )
    if getattr(cache, "cache_controller", None) is not None or not all(
        hasattr(cache, name) for name in walk_helpers
    ):
        # HiCache write-back or another upstream version: plain LRU eviction instead.
        return evict_lru_down_to(cache, 0)
    unlocked = core.walk_for_kv_canary(True, False).slot_indices
    high = unlocked[unlocked >= boundary_slot]
    if high.numel() == 0:
        return 0
    is_high = torch.zeros(int(high.max()) + 1, dtype=torch.bool)
    is_high[high] = True

    def qualifies(leaf: int) -> bool:
        path = core.collect_path_info([leaf])[0]
        slots = core.collect_full_device_indices(leaf, path[0].parent_id)
        slots = slots[(slots >= boundary_slot) & (slots < is_high.numel())]
        return bool(is_high[slots].any())

    tracker = {component: 0 for component in cache.tree_components}
    start = time.perf_counter()
    # A quota of everything evictable: the walk visits every leaf (and parents that become
    # leaves); skipping a leaf it returns is how upstream's walk is meant to be used.
    core.evict_device_start(full, core.full_evictable_size())
    try:
        while True:
            node, progress = cache._evict_device_next_node(full, tracker)
            if node is None:
                if not progress:
                    break
                continue
            if qualifies(node):
                cache._evict_device_leaf(node, tracker)
    finally:
        core.evict_device_end(full)
    cache.update_eviction_metrics(tracker[full], start)
    return int(tracker[full])


class _AtOrAboveFirst:
    """Eviction strategy: leaves under an unreferenced node holding a high slot come
    first, then upstream's own order."""

    def __init__(self, base: EvictionStrategy, boundary_slot: int) -> None:
        self.base = base
        self.boundary_slot = boundary_slot

    def qualifies(self, node: TreeNode) -> bool:
        while node is not None and node.lock_ref == 0 and node.value is not None:
            if node.value.numel() and int(node.value.max()) >= self.boundary_slot:
                return True
            node = node.parent
        return False

    def get_priority(self, node: TreeNode) -> tuple[int, object]:
        return (0 if self.qualifies(node) else 1, self.base.get_priority(node))


def _radix_evict_at_or_above(cache: RadixCache, boundary_slot: int) -> int:
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    strategy = _AtOrAboveFirst(cache.eviction_strategy, boundary_slot)
    qualifying = 0
    stack = [(child, False) for child in cache.root_node.children.values()]
    while stack:
        node, under = stack.pop()
        if node.lock_ref == 0:
            under = under or bool(
                node.value.numel() and int(node.value.max()) >= boundary_slot
            )
            if under:
                qualifying += len(node.value)
        stack.extend((child, under) for child in node.children.values())
    if qualifying == 0:
        return 0
    saved = cache.eviction_strategy
    cache.eviction_strategy = strategy
    try:
        # Qualifying leaves sort first, so exactly they go (whole leaves, in priority order).
        return int(cache.evict(EvictParams(num_tokens=qualifying)).num_tokens_evicted)
    finally:
        cache.eviction_strategy = saved
