"""Which pages each segment holds, and how many of them are free.

`SegmentPages` is integer arithmetic fixed at start: the pages of each segment the
allocator hands out (segment 0 loses the padding pages) and how many lie below each
segment. `Census` counts the free pages of each committed segment, for the shrink check.
"""

from __future__ import annotations

import bisect
from typing import Any

import torch

from sglang.srt.mem_cache.segmented.free_list import FreeList
from sglang.srt.mem_cache.segmented.geometry import SegmentGeometry

__all__ = ["Census", "SegmentPages"]


class SegmentPages:
    """The pages of each segment that are handed out, ``[first_page, cap_pages)`` split
    by segment: ``count[seg]`` of them in segment ``seg``, ``below[k]`` in segments
    ``[0, k)``."""

    def __init__(
        self, geometry: SegmentGeometry, first_page: int, device: torch.device
    ) -> None:
        self.geometry = geometry
        self.first_page = first_page
        self.device = device
        n = geometry.num_segments
        self.count: list[int] = [
            max(0, end - start) for start, end in map(self.range, range(n))
        ]
        self.below: list[int] = [0] * (n + 1)
        for seg in range(n):
            self.below[seg + 1] = self.below[seg] + self.count[seg]

    def range(self, seg: int) -> tuple[int, int]:
        """Pages ``[start, end)`` of ``seg`` that are handed out."""
        start, end = self.geometry.segment_pages_range(seg)
        return max(start, self.first_page), end

    def ids(self, seg: int) -> torch.Tensor:
        """Those pages as a sorted int64 tensor on the device."""
        start, end = self.range(seg)
        return torch.arange(
            start, max(start, end), dtype=torch.int64, device=self.device
        )

    def first_page_of(self, seg: int) -> int:
        """Page id where segment ``seg`` starts (``cap_pages`` past the last
        segment)."""
        return min(seg * self.geometry.segment_pages, self.geometry.cap_pages)

    def segments_holding(self, n_pages: int, at_least: int) -> int:
        """The fewest leading segments (at least ``at_least``) holding ``n_pages`` pages
        or more (all segments if the pool is smaller)."""
        keep = bisect.bisect_left(self.below, n_pages)
        return max(at_least, min(keep, self.geometry.num_segments))


class Census:
    """Free pages per committed segment, staged frees included (counted where they lie,
    not merged): one batched search over the sorted list and one scatter-add.

    A fresh census is read at once. A delayed one (the default on a GPU, where reading
    the counts at once waits for all queued work) is launched into host memory and the
    census launched at the previous call is returned if it has landed and the committed
    count is unchanged, else None. A stale census only nominates segments: the allocator
    checks a segment exactly before releasing it.
    """

    def __init__(self, pages: SegmentPages) -> None:
        self.pages = pages
        self.delayed = pages.device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        # Segment start pages per committed count (built once each).
        self._bounds: dict[int, torch.Tensor] = {}
        # The census launched at the previous delayed call: (committed, counts, event).
        self._launched: tuple[int, torch.Tensor, Any] | None = None
        # Two pinned landing buffers per committed count, used in turn.
        self._landing: dict[int, list[torch.Tensor]] = {}

    def forget(self) -> None:
        """Drop the census in flight (it is older than the next one will need)."""
        self._launched = None

    def free_per_segment(
        self, free: FreeList, committed: int, fresh: bool = True
    ) -> list[int] | None:
        """Free pages in each of the ``committed`` segments (None: no delayed census has
        landed yet)."""
        device = self.pages.device
        bounds = self._bounds.get(committed)
        if bounds is None:
            starts = [self.pages.range(seg)[0] for seg in range(committed)]
            bounds = torch.tensor(
                [*starts, self.pages.first_page_of(committed)],
                dtype=torch.int64,
                device=device,
            )
            self._bounds[committed] = bounds
        positions = torch.searchsorted(free.pages, bounds)
        counts = positions[1:] - positions[:-1]
        staged = free.staged_ids()
        if staged is not None:
            # Integer scatter, no sizing from the data: on a GPU nothing waits for the
            # device.
            segment_pages = self.pages.geometry.segment_pages
            counts = counts.index_add(
                0, staged // segment_pages, torch.ones_like(staged)
            )
        if fresh or not self.delayed:
            self._launched = None
            return counts.tolist()
        event = None
        landing = counts
        if device.type == "cuda":
            # Allocating pinned memory can itself synchronize, and the previous census
            # is read from the other buffer.
            pair = self._landing.get(committed)
            if pair is None:
                pair = [
                    torch.empty(committed, dtype=torch.int64, pin_memory=True)
                    for _ in range(2)
                ]
                self._landing[committed] = pair
            pair.reverse()
            landing = pair[0]
            landing.copy_(counts, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        previous, self._launched = self._launched, (committed, landing, event)
        if previous is None or previous[0] != committed:
            return None
        if previous[2] is not None and not previous[2].query():
            return None
        return previous[1].tolist()
