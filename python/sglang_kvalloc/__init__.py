"""sglang-kvalloc: static / segmented / auto KV allocation modes for SGLang 0.5.23.

Kept import-light on purpose: the bootstrap `.pth` imports this package in every Python
process, so nothing here may import torch or sglang.
"""

__version__ = "0.1.0"
