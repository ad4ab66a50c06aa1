"""Runs of consecutive pages, as a KV transfer engine sees them.

A transfer engine moves each run of consecutive slots as one block, and a block must
lie in one registered memory range: where the ranges are segments, no run may cross
a segment start.
"""

from __future__ import annotations

import torch

__all__ = ["split_runs_at_segment_starts"]


def split_runs_at_segment_starts(
    pages: torch.Tensor, segment_pages: int
) -> torch.Tensor:
    """``pages`` reordered so that no page is directly followed by the page that starts
    the next segment. Any order of the pages an allocation hands out is as good to its
    caller: slots are then written where they are used."""
    n = pages.numel()
    if n < 2 or segment_pages < 3:  # smaller segments: a swap could make a crossing
        return pages
    follows = pages[1:]
    crossing = ((follows - pages[:-1]) == 1) & (follows % segment_pages == 0)
    at = (torch.nonzero(crossing).flatten() + 1).tolist()  # one per start crossed
    if not at:
        return pages
    out = pages.clone()
    for i in at:
        # The segment's first page swaps with the page after it (before it, at the end).
        j = i + 1 if i + 1 < n else i - 1
        out[[i, j]] = out[[j, i]]
    return out
