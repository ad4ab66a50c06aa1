"""Segmented mode on upstream's pools: memory reserved up front, committed segment by segment.

- `kv_pools`: upstream's MHA and MLA KV pools with their buffers on segment-committed memory.
- `allocators`: upstream's token and paged allocators over the core's segment allocator.
- `swa_allocator`: upstream's hybrid SWA allocator with both sides segmented.
- `events`: what the allocators log (growth, shrink, failed commits).

`req_to_token` is `upstream.lazy_req_to_token`; which memory backs the reservations is
`upstream.backing_choice`. Importing this package imports upstream's pool and allocator classes.
"""

from sglang_kvalloc.upstream.segmented.allocators import (
    SHRINK_CHECK_EVERY_ITERATIONS,
    SYNC_EVERY_ITERATIONS,
    SegmentedAllocator,
    SegmentedAllocatorMixin,
    SegmentedPagedTokenToKVPoolAllocator,
    SegmentedTokenToKVPoolAllocator,
    segmented_allocator_for,
)
from sglang_kvalloc.upstream.segmented.kv_pools import (
    SegmentedMHATokenToKVPool,
    SegmentedMLATokenToKVPool,
)
from sglang_kvalloc.upstream.segmented.swa_allocator import SegmentedSWATokenToKVPoolAllocator

__all__ = [
    "SHRINK_CHECK_EVERY_ITERATIONS",
    "SYNC_EVERY_ITERATIONS",
    "SegmentedAllocator",
    "SegmentedAllocatorMixin",
    "SegmentedMHATokenToKVPool",
    "SegmentedMLATokenToKVPool",
    "SegmentedPagedTokenToKVPoolAllocator",
    "SegmentedSWATokenToKVPoolAllocator",
    "SegmentedTokenToKVPoolAllocator",
    "segmented_allocator_for",
]
