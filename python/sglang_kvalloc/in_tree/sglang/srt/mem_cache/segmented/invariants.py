"""The page accounting a healthy allocator keeps, as a list of what is wrong
(O(capacity)).

Checked by the tests after every step and by upstream's idle diagnostic under its debug
switch.
"""

from __future__ import annotations

from typing import Protocol

import torch

from sglang.srt.mem_cache.segmented.census import SegmentPages
from sglang.srt.mem_cache.segmented.free_list import FreeList
from sglang.srt.mem_cache.segmented.geometry import SegmentGeometry
from sglang.srt.mem_cache.segmented.ledger import PageLedger

__all__ = ["PageAccounting", "accounting_problems"]


class PageAccounting(Protocol):
    """What the check reads of an allocator (`SegmentedPageAllocator`): its segments,
    its free pages and, in debug mode, its ledger of allocated pages."""

    geometry: SegmentGeometry
    first_page: int
    committed_segments: int
    min_committed_segments: int
    peak_committed_segments: int
    releases: int
    pages: SegmentPages
    free_list: FreeList
    ledger: PageLedger | None

    @property
    def free_pages(self) -> torch.Tensor: ...

    def all_free_pages(self) -> torch.Tensor: ...

    def first_page_of(self, seg: int) -> int: ...

    def free_per_segment(self, fresh: bool = True) -> list[int] | None: ...

    def used_count(self) -> int: ...


def accounting_problems(alloc: PageAccounting) -> list[str]:
    """Everything inconsistent in ``alloc``'s page accounting; empty when healthy."""
    g = alloc.geometry
    k = alloc.committed_segments
    problems: list[str] = []
    resting = (
        k == 0 and alloc.releases > 0
    )  # suspended (RL), or resumed with nothing asked
    if not resting and not 1 <= alloc.min_committed_segments <= k <= g.num_segments:
        problems.append(
            f"{k} committed segments outside [{alloc.min_committed_segments}, ...]"
        )
    if alloc.peak_committed_segments < k:
        problems.append("peak below committed")
    free = alloc.free_pages
    if free.dtype != torch.int64:
        problems.append(f"free_pages dtype {free.dtype}")
    if len(free) > 1 and not bool((free[1:] > free[:-1]).all()):
        problems.append("free_pages not sorted/unique")
    every_free = alloc.all_free_pages()
    if len(every_free) != len(free) + alloc.free_list.num_staged:
        problems.append("staged count mismatch")
    duplicates = len(every_free) - len(torch.unique(every_free))
    if duplicates:
        problems.append(f"{duplicates} page(s) free twice")
    limit = alloc.first_page_of(k)
    if len(every_free):
        if int(every_free.min()) < alloc.first_page:
            problems.append("padding page in the free list")
        if int(every_free.max()) >= limit:
            problems.append("free page in an uncommitted segment")
    if not duplicates:
        usable = alloc.pages.count
        for seg, free_count in enumerate(alloc.free_per_segment() or []):
            if free_count > usable[seg]:
                problems.append(f"segment {seg}: {free_count} free of {usable[seg]}")
    if alloc.used_count() < 0:
        problems.append(f"{-alloc.used_count()} more pages free than committed")
    if alloc.ledger is not None:
        if alloc.ledger.any_of(every_free):
            problems.append("free page is also allocated")
        if alloc.ledger.used() != alloc.used_count():
            problems.append("allocated bitmap disagrees with the free list")
    return problems
