"""Segments: KV buffers committed a segment at a time, and the page allocator that drives them.

- `buffers.SegmentedBuffers`: the memory, committed and released by segment.
- `allocator.SegmentedPageAllocator`: upstream's verbs (`alloc`, `free`) over segments that are
  committed as pages are needed and given back when trailing ones stay free, made of small
  parts: `free_list` (sorted free pages, staged frees), `census` (free pages per segment),
  `growth` (the ceiling after a failed commit), `shrink` (hold-off clocks), `ledger` (debug
  checks) and `invariants` (the accounting a healthy allocator keeps).

The geometry (which rows a segment holds, the segment size) is `core.geometry` (torch-free).
"""

from sglang_kvalloc.core.geometry import (
    DEFAULT_SEGMENT_TOKENS,
    SegmentGeometry,
    aligned_segment_tokens,
    default_segment_tokens,
)
from sglang_kvalloc.core.segments.allocator import (
    MERGE_STAGED_FRACTION,
    Agree,
    SegmentedPageAllocator,
)
from sglang_kvalloc.core.segments.buffers import SegmentedBuffers
from sglang_kvalloc.core.segments.ledger import PageAccountingError

__all__ = [
    "DEFAULT_SEGMENT_TOKENS",
    "MERGE_STAGED_FRACTION",
    "Agree",
    "PageAccountingError",
    "SegmentGeometry",
    "SegmentedBuffers",
    "SegmentedPageAllocator",
    "aligned_segment_tokens",
    "default_segment_tokens",
]
