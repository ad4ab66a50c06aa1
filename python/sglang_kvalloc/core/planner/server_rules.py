"""The server's own rules the planner reads: the graph-buffer layouts and the rows' room
(in-tree modules, standard library only), loaded once for every part of the planner.

Where SGLang is not loaded (the planner's CLI runs where torch does not), a standalone
load of the same files (`in_tree_finder.standalone`); in a server process, upstream's
names for them. The planner is not part of the upstream series.
"""

from __future__ import annotations

from sglang_kvalloc.in_tree_finder import standalone

graph_layouts = standalone("sglang.srt.mem_cache.segmented.graph_layouts")
row_room = standalone("sglang.srt.mem_cache.segmented.row_room")

__all__ = ["graph_layouts", "row_room"]
