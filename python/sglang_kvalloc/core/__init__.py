"""The planner, which upstream would not take as it is (its model tables and the CLI's
estimates); the backings, the shared budget and the segment core are upstream-ready, in
``in_tree/`` (``sglang.srt.mem_cache.segmented``).

Of upstream it imports only the modules of ``in_tree/``, which import nothing else of
upstream (test_import_graph.py, test_in_tree.py).
"""
