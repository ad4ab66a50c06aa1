"""Upstream-free core of sglang-kvalloc: backings, segment geometry and allocator arithmetic.

Nothing in this package imports sglang; torch is the only heavy dependency.
"""
