"""Segmented KV memory: buffers committed a segment at a time, and the allocator driving
them.

- `backing`: reserved address space whose memory is committed and released in ranges.
- `geometry`: which rows a segment holds; the segment-size rules (torch-free).
- `buffers.SegmentedBuffers`: K and V of every layer committed and released by segment.
- `allocator.SegmentedPageAllocator`: upstream's verbs (`alloc`, `free`) over segments
  committed as pages are needed and given back when trailing ones stay free, made of
  small parts: `free_list`, `census`, `growth`, `shrink`, `ledger` and `invariants`.
- `row_commits.RowCommits`: a table reserved whole and committed row prefix by row
  prefix (req_to_token rows, RoPE caches, graph buffers); `rope_cache.FixedAddressRope`
  on it.
- `graph_layouts` (torch-free) and `graph_buffers.LazyGraphBuffer`: context-sized
  cuda-graph index buffers reserved at their shape and committed as far as a replay
  writes.

The package imports nothing itself, so a module of it costs only what that module needs.
"""
