"""Segmented KV memory: buffers committed a segment at a time, and the allocator driving
them.

- `backing`: reserved address space whose memory is committed and released in ranges.
- `geometry`: which rows a segment holds; the segment-size rules (torch-free).
- `buffers.SegmentedBuffers`: K and V of every layer committed and released by segment.
- `allocator.SegmentedPageAllocator`: upstream's verbs (`alloc`, `free`) over segments
  committed as pages are needed and given back when trailing ones stay free, made of
  small parts: `free_list`, `census`, `growth`, `shrink`, `ledger` and `invariants`.

The package imports nothing itself, so a module of it costs only what that module needs.
"""
