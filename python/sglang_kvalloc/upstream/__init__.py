"""The thin layer that touches upstream SGLang. Everything outside this folder is upstream-free."""
