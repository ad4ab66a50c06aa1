"""The core of sglang-kvalloc that upstream would not take as it is: the CPU and CUDA
backings, the row and RoPE commits, the graph-buffer layouts, the planner, the shared budget.

Of upstream it imports only the modules of ``in_tree/`` (``sglang.srt.mem_cache.segmented``),
which import nothing else of upstream (test_import_graph.py, test_in_tree.py).
"""
