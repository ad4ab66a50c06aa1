"""``sgl_kernel.kvcacheio`` stand-in: imported unguarded by upstream's host KV pools
(``mem_cache/pool_host/mha.py``, ``memory_pool_host.py``) on CUDA; its transfer ops (the
hierarchical cache, off here) raise when called."""

from ._missing import missing_getattr

__getattr__ = missing_getattr("kvcacheio")
