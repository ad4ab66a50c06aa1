"""Buffers (K and V of every layer, say) whose memory is committed and released
together, one segment at a time, over reserved backings: one contiguous tensor each, so
slot ids never move.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from sglang.srt.mem_cache.segmented.backing import Backing, BackingFactory
from sglang.srt.mem_cache.segmented.geometry import (
    SegmentGeometry,
    align_down,
    align_up,
)

__all__ = ["SegmentListener", "SegmentedBuffers"]


class SegmentListener(Protocol):
    """Told of each segment committed and of each about to be released: a transfer engine
    registers the memory it may write into (RDMA needs it backed) and deregisters it first."""

    def segment_committed(self, buffers: SegmentedBuffers, seg: int) -> None: ...

    def segment_releasing(self, buffers: SegmentedBuffers, seg: int) -> None: ...


class SegmentedBuffers:
    """Several backings (e.g. K and V per layer) committed and released one segment at a
    time.

    Buffer ``b`` holds ``rows = cap_tokens + extra_rows`` rows of ``row_bytes[b]``
    bytes. The ``extra_rows`` trailing rows (if any) lie outside segment management and
    stay committed. Segment 0 holds the padding slot, which padded tokens write into, so
    it is committed at construction and can never be released.
    """

    def __init__(
        self,
        geometry: SegmentGeometry,
        backings: Sequence[Backing],
        row_bytes: Sequence[int],
        extra_rows: int = 0,
    ) -> None:
        if len(backings) != len(row_bytes):
            raise ValueError(f"{len(backings)} backings but {len(row_bytes)} row sizes")
        if extra_rows < 0:
            raise ValueError(f"extra_rows must be non-negative, got {extra_rows}")
        self.geometry: SegmentGeometry = geometry
        self.backings: list[Backing] = list(backings)
        self.row_bytes: list[int] = list(row_bytes)
        self.rows: int = geometry.cap_tokens + extra_rows
        # Per buffer: where segment ranges stop, so they never touch the pinned extra
        # rows.
        self._limit: list[int] = []
        for backing, rb in zip(self.backings, self.row_bytes, strict=True):
            g = backing.granularity
            seg_bytes = geometry.segment_tokens * rb
            # One segment spans the whole pool: it is committed whole, so any size works
            # (upstream builds pools of any size; a tiny one is smaller than a granule).
            if seg_bytes % g and geometry.num_segments > 1:
                raise ValueError(
                    f"segment of {geometry.segment_tokens} tokens x {rb} bytes = {seg_bytes} "
                    f"bytes is not a multiple of the backing granularity {g}; use "
                    f"aligned_segment_tokens() to pick the segment size"
                )
            if backing.reserved_bytes < self.rows * rb:
                raise ValueError(
                    f"backing reserves {backing.reserved_bytes} bytes but {self.rows} rows x "
                    f"{rb} bytes need {self.rows * rb}"
                )
            if extra_rows:
                # The extra rows may share a granule with the last segment; that granule
                # is pinned with them and left out of the segment's range.
                pin_lo = align_down(geometry.cap_tokens * rb, g)
                backing.commit(pin_lo, align_up(self.rows * rb, g) - pin_lo)
                self._limit.append(pin_lo)
            else:
                self._limit.append(align_up(self.rows * rb, g))
        self._committed: list[bool] = [False] * geometry.num_segments
        self._listeners: list[SegmentListener] = []
        self.commit_segment(0)

    @classmethod
    def create(
        cls,
        geometry: SegmentGeometry,
        row_bytes: Sequence[int],
        backings: BackingFactory,
        extra_rows: int = 0,
    ) -> SegmentedBuffers:
        """Reserve one backing per row size from ``backings``, and have the handles of
        every buffer's next segment made before they are needed."""
        rows = geometry.cap_tokens + extra_rows
        made = [backings(rows * rb) for rb in row_bytes]
        buffers = cls(geometry, made, row_bytes, extra_rows)
        for size in {buffers.byte_range(b, 0)[1] for b in range(len(made))}:
            count = sum(buffers.byte_range(b, 0)[1] == size for b in range(len(made)))
            backings.keep_spares(size, count)
        return buffers

    def byte_range(self, buffer: int, seg: int) -> tuple[int, int]:
        """Byte offset and size that segment ``seg`` commits in buffer ``buffer``."""
        rb = self.row_bytes[buffer]
        g = self.backings[buffer].granularity
        lo_row, hi_row = self.geometry.segment_rows(seg)
        lo = lo_row * rb  # granule-aligned: segment byte size is a granularity multiple
        hi = min(align_up(hi_row * rb, g), self._limit[buffer])
        return lo, max(0, hi - lo)

    def commit_segment(self, seg: int) -> None:
        """Commit segment ``seg`` in every buffer; no-op if already committed."""
        if self._committed[seg]:
            return
        done: list[int] = []
        try:
            # One device wait before the first buffer covers them all: nothing is queued
            # in between (the mappings change on this thread only).
            for b, backing in enumerate(self.backings):
                backing.commit(*self.byte_range(b, seg), unused=bool(done))
                done.append(b)
        except BaseException:
            # All-or-nothing: a half-committed segment would leak memory nobody tracks.
            for b in done:
                self.backings[b].release(*self.byte_range(b, seg), unused=True)
            raise
        self._committed[seg] = True
        if seg == 0:
            self._zero_padding_page()
        told: list[SegmentListener] = []
        try:
            for listener in self._listeners:
                listener.segment_committed(self, seg)
                told.append(listener)
        except Exception as exc:
            # A segment a listener refused is not usable: the commit fails as a whole.
            for listener in told:
                listener.segment_releasing(self, seg)
            self._release_memory(seg)
            raise MemoryError(f"segment {seg} committed but refused: {exc}") from exc

    def add_listener(self, listener: SegmentListener) -> None:
        """Tell ``listener`` of every commit and release from now on (the segments committed
        already are the caller's to account for)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: SegmentListener) -> None:
        self._listeners.remove(listener)

    def _zero_padding_page(self) -> None:
        """Slot 0's page, which padded cuda-graph batches read, holds zeros as in
        upstream's `torch.zeros` pools: a GPU's freshly committed memory is not
        zeroed."""
        page_rows = self.geometry.page_size
        for backing, rb in zip(self.backings, self.row_bytes, strict=True):
            backing.tensor(torch.uint8, (page_rows * rb,)).zero_()

    def release_segment(self, seg: int) -> None:
        """Release segment ``seg`` in every buffer; no-op if not committed."""
        if seg == 0:
            raise ValueError("segment 0 holds the padding slot and must stay committed")
        if not self._committed[seg]:
            return
        for listener in self._listeners:
            listener.segment_releasing(self, seg)
        self._release_memory(seg)

    def _release_memory(self, seg: int) -> None:
        for b, backing in enumerate(self.backings):  # one device wait, before the first
            backing.release(*self.byte_range(b, seg), unused=b > 0)
        self._committed[seg] = False

    def release_all(self) -> int:
        """Give back every committed segment, the first too (RL's memory release:
        nothing is allocated); the first commit after it zeroes the padding page again.
        Returns the segments released."""
        released = 0
        for seg in range(len(self._committed)):
            if not self._committed[seg]:
                continue
            for listener in self._listeners:
                listener.segment_releasing(self, seg)
            for b, backing in enumerate(
                self.backings
            ):  # one device wait, before the first
                backing.release(*self.byte_range(b, seg), unused=released > 0 or b > 0)
            self._committed[seg] = False
            released += 1
        return released

    def is_committed(self, seg: int) -> bool:
        return self._committed[seg]

    @property
    def committed_segments(self) -> int:
        return sum(self._committed)

    @property
    def committed_bytes(self) -> int:
        return sum(b.committed_bytes for b in self.backings)

    def close(self) -> None:
        for backing in self.backings:
            backing.close()
