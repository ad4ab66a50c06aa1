"""The core of sglang-kvalloc that upstream would not take as it is: the CPU and CUDA
backings, the planner, the shared budget (the row and RoPE commits and the graph buffers
are upstream-ready, in ``in_tree/``).

Of upstream it imports only the modules of ``in_tree/`` (``sglang.srt.mem_cache.segmented``),
which import nothing else of upstream (test_import_graph.py, test_in_tree.py).
"""
