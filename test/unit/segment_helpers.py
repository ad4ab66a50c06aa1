"""Helpers of the segment tests: a clock, page tensors, an allocator recording its calls."""

from __future__ import annotations

import mmap

import torch
from sglang.srt.mem_cache.segmented.allocator import SegmentedPageAllocator
from sglang.srt.mem_cache.segmented.geometry import SegmentGeometry

PAGE = mmap.PAGESIZE
MB = 1 << 20


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def pages(*ids: int) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.int64)


def span(lo: int, hi: int) -> list[int]:
    return list(range(lo, hi))


def make_alloc(
    cap: int = 256, seg: int = 64, ps: int = 1, **kwargs: object
) -> tuple[SegmentedPageAllocator, list[tuple[str, int]], FakeClock]:
    events: list[tuple[str, int]] = []
    clock = FakeClock()
    alloc = SegmentedPageAllocator(
        SegmentGeometry(cap, seg, ps),
        clock=clock,
        on_commit=lambda s: events.append(("commit", s)),
        on_release=lambda s: events.append(("release", s)),
        debug=True,
        **kwargs,  # type: ignore[arg-type]
    )
    return alloc, events, clock
