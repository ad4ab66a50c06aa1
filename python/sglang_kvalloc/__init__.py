"""sglang-kvalloc: static / segmented / auto KV allocation modes for SGLang 0.5.23.

Kept import-light on purpose: the bootstrap `.pth` imports this package in every Python
process, so nothing here may import torch or sglang. Importing it makes the modules that would
be upstream's (``in_tree/``) importable under their upstream names (`in_tree_finder`).
"""

from sglang_kvalloc import in_tree_finder

in_tree_finder.install()

__version__ = "0.1.0"
