"""How a KV pool's rows split into segments, and the segment size. Stdlib only (no
torch).

Row space. Slot index == row index in every buffer. The segmented space is rows ``[0,
cap_tokens)``, i.e. pages ``[0, cap_pages)``; segment ``i`` is pages ``[i *
segment_pages, (i + 1) * segment_pages)`` clipped to the cap (the last one may be
partial). Page 0 is the padding page upstream writes dummy outputs into, so segment 0 is
always committed and the allocator hands out pages from ``first_page = 1``.

Mapping an upstream pool of ``size`` usable tokens: ``cap_tokens = size + page_size``
(upstream buffers have exactly that many rows), ``first_page = 1``; the allocator then
serves pages ``1 .. size // page_size``, the same ids upstream's allocators use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "DEFAULT_SEGMENT_TOKENS",
    "MAX_POOL_TOKENS",
    "SegmentChoice",
    "SegmentGeometry",
    "align_up",
    "aligned_segment_tokens",
    "choose_segment_tokens",
    "default_segment_tokens",
    "launch_segment_problem",
    "requested_segment_problem",
]


def align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def align_down(value: int, alignment: int) -> int:
    return value // alignment * alignment


class SegmentGeometry:
    """How ``cap_tokens`` rows split into segments of ``segment_tokens`` rows."""

    def __init__(self, cap_tokens: int, segment_tokens: int, page_size: int) -> None:
        if page_size <= 0:
            raise ValueError(f"page_size must be positive, got {page_size}")
        if cap_tokens <= 0:
            raise ValueError(f"KV cap must be positive, got {cap_tokens} tokens")
        if cap_tokens % page_size:
            raise ValueError(
                f"KV cap of {cap_tokens} tokens is not a multiple of page_size {page_size}; "
                f"round it down to {align_down(cap_tokens, page_size)}"
            )
        if segment_tokens == 0:
            raise ValueError("segment size must be positive, got 0 tokens")
        if segment_tokens < 0:
            raise ValueError(
                f"segment size must be positive, got {segment_tokens} tokens"
            )
        if segment_tokens % page_size:
            raise ValueError(
                f"segment size of {segment_tokens} tokens is not a multiple of page_size "
                f"{page_size}"
            )
        if segment_tokens > cap_tokens:
            raise ValueError(
                f"segment size of {segment_tokens} tokens is larger than the KV cap of "
                f"{cap_tokens} tokens"
            )
        self.cap_tokens: int = cap_tokens
        self.segment_tokens: int = segment_tokens
        self.page_size: int = page_size
        self.cap_pages: int = cap_tokens // page_size
        self.segment_pages: int = segment_tokens // page_size
        self.num_segments: int = -(-cap_tokens // segment_tokens)

    def __repr__(self) -> str:
        return (
            f"SegmentGeometry(cap_tokens={self.cap_tokens}, segment_tokens={self.segment_tokens}, "
            f"page_size={self.page_size}, num_segments={self.num_segments})"
        )

    def segment_pages_range(self, seg: int) -> tuple[int, int]:
        """Page ids ``[start, end)`` of segment ``seg``."""
        self._check_segment(seg)
        start = seg * self.segment_pages
        return start, min(start + self.segment_pages, self.cap_pages)

    def segment_rows(self, seg: int) -> tuple[int, int]:
        """Rows (slots) ``[start, end)`` of segment ``seg``."""
        start, end = self.segment_pages_range(seg)
        return start * self.page_size, end * self.page_size

    def segment_of_page(self, page: int) -> int:
        return page // self.segment_pages

    def _check_segment(self, seg: int) -> None:
        if not 0 <= seg < self.num_segments:
            raise IndexError(f"segment {seg} out of range [0, {self.num_segments})")


# -- The segment size: every rule about --kv-segment-tokens lives here
# ------------------------

DEFAULT_SEGMENT_TOKENS = 8192
# Small pools still get several segments, so growth and shrink happen at all.
MIN_SEGMENTS_BY_DEFAULT = 16
# Slot indices are int32: no pool, so no segment, holds more tokens.
MAX_POOL_TOKENS = 2**31 - 1


def requested_segment_problem(tokens: int) -> str | None:
    """Why a requested segment size is invalid whatever the server (one line), else
    None."""
    if tokens <= 0:
        return f"segment size must be positive, got {tokens}"
    if tokens > MAX_POOL_TOKENS:
        return (
            f"--kv-segment-tokens {tokens} is larger than any KV pool can be "
            f"({MAX_POOL_TOKENS} tokens: slot indices are int32)"
        )
    return None


def launch_segment_problem(
    tokens: int, page_size: int | None, max_total_tokens: int | None
) -> str | None:
    """Why a requested segment size cannot work with the command line (what the launcher
    can tell before the pool is sized), else None."""
    problem = requested_segment_problem(tokens)
    if problem is not None:
        return problem
    if page_size and tokens % int(page_size):
        return (
            f"--kv-segment-tokens {tokens} is not a multiple of --page-size {page_size}"
        )
    if max_total_tokens and tokens > int(max_total_tokens):
        return (
            f"--kv-segment-tokens {tokens} is larger than the KV pool "
            f"(--max-total-tokens {max_total_tokens})"
        )
    return None


@dataclass(frozen=True)
class SegmentChoice:
    """The segment size a pool uses, and what the operator should be told about it."""

    tokens: int
    note: str | None = None


def choose_segment_tokens(
    requested: int | None,
    cap_tokens: int,
    page_size: int,
    row_bytes: Sequence[int],
    granularity: int,
) -> SegmentChoice:
    """The segment size of a pool of ``cap_tokens``: the request (made a page multiple,
    at most the pool) or the default; then rounded up so every buffer's segment spans
    whole granules of the backing. Used by the server and the planner alike."""
    note = None
    if requested is not None:
        size = -(-requested // page_size) * page_size
        if size > cap_tokens:
            # The launcher refuses what it can tell is too large; the exact pool is only
            # known once the weights are loaded.
            note = (
                f"--kv-segment-tokens {requested} is larger than the KV pool "
                f"({cap_tokens - page_size} tokens): one segment holds the whole pool."
            )
            size = cap_tokens
        elif size != requested:
            note = (
                f"--kv-segment-tokens {requested} rounded up to {size}, a multiple of "
                f"--page-size {page_size}."
            )
    else:
        size = default_segment_tokens(cap_tokens, page_size)
    aligned = aligned_segment_tokens(size, page_size, row_bytes, granularity)
    return SegmentChoice(
        min(aligned, math.ceil(cap_tokens / page_size) * page_size), note
    )


def default_segment_tokens(cap_tokens: int, page_size: int) -> int:
    """The segment size when none is asked for: 8,192 tokens, or a sixteenth of a
    smaller pool, in whole pages (before granule alignment)."""
    size = min(DEFAULT_SEGMENT_TOKENS, cap_tokens // MIN_SEGMENTS_BY_DEFAULT)
    return max(page_size, size // page_size * page_size)


def aligned_segment_tokens(
    requested: int, page_size: int, row_bytes_list: Sequence[int], granularity: int
) -> int:
    """Round ``requested`` up to the smallest multiple of ``page_size`` whose byte size
    is a multiple of ``granularity`` in every buffer, so segment commit/release ranges
    are exact."""
    if requested <= 0:
        raise ValueError(f"segment size must be positive, got {requested} tokens")
    if page_size <= 0 or granularity <= 0:
        raise ValueError(
            f"page_size {page_size} and granularity {granularity} must be positive"
        )
    step = page_size
    for row_bytes in row_bytes_list:
        if row_bytes <= 0:
            raise ValueError(f"row size must be positive, got {row_bytes} bytes")
        # tokens * row_bytes % granularity == 0  <=>  tokens % (granularity / gcd) == 0
        step = math.lcm(step, granularity // math.gcd(row_bytes, granularity))
    return align_up(requested, step)
