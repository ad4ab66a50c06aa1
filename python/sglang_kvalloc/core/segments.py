"""Segment geometry, buffers that commit by segment, and a segment-aware page allocator.

Row space. Slot index == row index in every buffer. The segmented space is rows
``[0, cap_tokens)``, i.e. pages ``[0, cap_pages)``; segment ``i`` is pages
``[i * segment_pages, (i + 1) * segment_pages)`` clipped to the cap (the last one may be
partial). Page 0 is the padding page upstream writes dummy outputs into, so segment 0 is always
committed and the allocator hands out pages from ``first_page = 1``.

Mapping an upstream pool of ``size`` usable tokens: ``cap_tokens = size + page_size`` (upstream
buffers have exactly that many rows), ``first_page = 1``; the allocator then serves pages
``1 .. size // page_size``, the same ids upstream's allocators use.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from sglang_kvalloc.core.backing import Backing, BackingFactory, make_backing
from sglang_kvalloc.core.geometry import (
    SegmentGeometry,
    align_down,
    align_up,
    aligned_segment_tokens,
    default_segment_tokens,
)

__all__ = [
    "PageAccountingError",
    "SegmentGeometry",
    "SegmentedBuffers",
    "SegmentedPageAllocator",
    "aligned_segment_tokens",
    "default_segment_tokens",
]


def _merge_sorted(sorted_ids: torch.Tensor, new_ids: torch.Tensor) -> torch.Tensor:
    """Merge ``new_ids`` (any order) into ascending ``sorted_ids``; ids must be disjoint.

    On the CPU numpy's stable sort (timsort) finds the sorted list and the ascending runs
    that freed requests' slots form, and merges them in one pass, single-threaded: 120 us for
    F = 11k, k = 9k in three runs (290 us when ``new_ids`` was sorted first), where the torch
    version below took 5-45 ms at F = 60k, k = 30k depending on machine load.
    """
    if new_ids.numel() == 0:
        return sorted_ids
    if sorted_ids.device.type == "cpu" and new_ids.device.type == "cpu":
        merged = np.concatenate((sorted_ids.numpy(), new_ids.numpy()))
        merged.sort(kind="stable")
        return torch.from_numpy(merged)
    new_ids, _ = torch.sort(new_ids)
    if sorted_ids.numel() == 0:
        return new_ids
    # Final position of every id: ids before it in its own list plus ids before it in the
    # other. Integer scatters only, so on a GPU nothing waits for the device.
    pos_new = torch.searchsorted(sorted_ids, new_ids) + torch.arange(
        new_ids.numel(), device=new_ids.device
    )
    pos_old = torch.searchsorted(new_ids, sorted_ids) + torch.arange(
        sorted_ids.numel(), device=sorted_ids.device
    )
    out = torch.empty(
        sorted_ids.numel() + new_ids.numel(), dtype=torch.int64, device=pos_new.device
    )
    out[pos_new] = new_ids
    out[pos_old] = sorted_ids
    return out


# While serving, staged frees are merged into the sorted free list at a shrink check once they
# number 1/this of it: merging is O(free pages) (150 us at 40k on the CPU), and between merges
# allocation reaches at most that many pages further up than with the list kept sorted.
MERGE_STAGED_FRACTION = 8


class SegmentedBuffers:
    """Several backings (e.g. K and V per layer) committed and released one segment at a time.

    Buffer ``b`` holds ``rows = cap_tokens + extra_rows`` rows of ``row_bytes[b]`` bytes. The
    ``extra_rows`` trailing rows (if any) lie outside segment management and stay committed.
    Segment 0 holds the padding slot, which padded tokens write into, so it is committed at
    construction and can never be released.
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
        # Per buffer: where segment ranges stop, so they never touch the pinned extra rows.
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
                # The extra rows may share a granule with the last segment; that granule is
                # pinned with them and left out of the segment's range.
                pin_lo = align_down(geometry.cap_tokens * rb, g)
                backing.commit(pin_lo, align_up(self.rows * rb, g) - pin_lo)
                self._limit.append(pin_lo)
            else:
                self._limit.append(align_up(self.rows * rb, g))
        self._committed: list[bool] = [False] * geometry.num_segments
        self.commit_segment(0)

    @classmethod
    def create(
        cls,
        geometry: SegmentGeometry,
        row_bytes: Sequence[int],
        device: str = "cpu",
        granularity: int | None = None,
        extra_rows: int = 0,
        backings: BackingFactory | None = None,
    ) -> SegmentedBuffers:
        """Reserve one backing per row size, from ``backings`` (else a CPU one)."""
        rows = geometry.cap_tokens + extra_rows
        if backings is None:
            made = [make_backing(device, rows * rb, granularity) for rb in row_bytes]
        else:
            made = [backings(rows * rb) for rb in row_bytes]
        buffers = cls(geometry, made, row_bytes, extra_rows)
        if backings is not None:
            # Handles for the next segment of every buffer, created before they are needed.
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

    def release_segment(self, seg: int) -> None:
        """Release segment ``seg`` in every buffer; no-op if not committed."""
        if seg == 0:
            raise ValueError("segment 0 holds the padding slot and must stay committed")
        if not self._committed[seg]:
            return
        for b, backing in enumerate(self.backings):  # one device wait, before the first
            backing.release(*self.byte_range(b, seg), unused=b > 0)
        self._committed[seg] = False

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


class PageAccountingError(AssertionError, ValueError):
    """A debug check caught a bad free (double free, page outside the pool, ...).

    An AssertionError, as upstream's own allocator debug checks raise, and a ValueError, since
    the pages passed in are wrong."""


def _agree_alone(value: int) -> int:
    return value


class SegmentedPageAllocator:
    """Page allocator that commits segments on demand and releases trailing empty ones.

    Pages live in ``[first_page, cap_pages)``. Committed segments are always a prefix
    ``[0, committed_segments)``: growth commits the lowest uncommitted segment, shrinking
    releases the highest committed one. ``free_pages`` is a sorted int64 tensor of free pages
    in committed segments (like upstream's); allocation takes the lowest ids so load packs into
    low segments and high ones drain.

    A commit that fails (``on_commit`` raises MemoryError) lowers the *ceiling*: segments at or
    above it are withheld, so `available_pages` drops and the caller queues work as for a full
    pool instead of being promised memory that cannot be had. `prepare` retries every
    ``retry_s`` and lifts the ceiling once a commit succeeds.

    Several ranks (tensor parallelism) must commit and release the same segments. Every
    decision that could differ between them (a commit's outcome, how far to shrink, whether
    to retry) goes through ``agree``: the minimum of an int over all ranks, called at the same
    point on every rank. Allocation state is otherwise identical on all ranks, so they stay in
    lock-step. The default ``agree`` is a single rank's identity.

    ``lazy_merge=True`` mirrors upstream's ``need_sort``: freed pages are staged and merged into
    ``free_pages`` only when an allocation runs short and on every `maybe_shrink` call. Eager
    mode merges on every free, O(free pages) each (about 1.6 ms at 500k free pages here).
    """

    def __init__(
        self,
        geometry: SegmentGeometry,
        *,
        first_page: int = 1,
        min_committed_segments: int = 1,
        hold_off_s: float = 5.0,
        retry_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        on_commit: Callable[[int], None] | None = None,
        on_release: Callable[[int], None] | None = None,
        agree: Callable[[int], int] | None = None,
        lazy_merge: bool = False,
        debug: bool = False,
        device: str | torch.device = "cpu",
    ) -> None:
        if not 0 <= first_page < geometry.cap_pages:
            raise ValueError(
                f"first_page {first_page} must lie in [0, {geometry.cap_pages}) (the cap in pages)"
            )
        if not 1 <= min_committed_segments <= geometry.num_segments:
            raise ValueError(
                f"min_committed_segments {min_committed_segments} must lie in "
                f"[1, {geometry.num_segments}]"
            )
        if math.isnan(hold_off_s) or hold_off_s < 0:
            raise ValueError(f"hold_off_s must be >= 0 (inf: never release), got {hold_off_s}")
        if math.isnan(retry_s) or retry_s < 0:
            raise ValueError(f"retry_s must be >= 0, got {retry_s}")
        self.geometry: SegmentGeometry = geometry
        self.first_page: int = first_page
        self.min_committed_segments: int = min_committed_segments
        self.hold_off_s: float = hold_off_s
        self.retry_s: float = retry_s
        self.clock: Callable[[], float] = clock
        self.on_commit: Callable[[int], None] | None = on_commit
        self.on_release: Callable[[int], None] | None = on_release
        self.agree: Callable[[int], int] = agree or _agree_alone
        self.lazy_merge: bool = lazy_merge
        self.debug: bool = debug
        self.device: torch.device = torch.device(device)
        self.committed_segments: int = 0
        self.peak_committed_segments: int = 0
        self.commits: int = 0
        self.releases: int = 0
        self.commit_failures: int = 0
        # Segments >= ceiling are withheld after a failed commit (see the class docstring).
        self.ceiling: int = geometry.num_segments
        self.last_commit_error: str | None = None
        self._failed_at: float = 0.0
        # _pages_below[k]: usable pages in segments [0, k).
        self._pages_below: list[int] = [0] * (geometry.num_segments + 1)
        # _usable_pages_in[seg]: pages of seg this allocator hands out (read in every check).
        self._usable_pages_in: list[int] = [
            self._usable_count(s) for s in range(geometry.num_segments)
        ]
        for seg in range(geometry.num_segments):
            self._pages_below[seg + 1] = self._pages_below[seg] + self._usable_pages_in[seg]
        # The periodic census is delayed on a GPU, where reading it at once would wait for the
        # queued work (tests turn it on for the CPU to exercise the same protocol).
        self.delayed_census: bool = self.device.type == "cuda"
        self._init_state()
        self.grow_to(min_committed_segments)
        if self.committed_segments < min_committed_segments:
            raise MemoryError(
                f"cannot commit the first {min_committed_segments} segment(s): "
                f"{self.last_commit_error}"
            )

    # -- state ---------------------------------------------------------------------------

    def _init_state(self) -> None:
        g = self.geometry
        self.free_pages: torch.Tensor = torch.empty((0,), dtype=torch.int64, device=self.device)
        self._staged: list[torch.Tensor] = []
        self._num_staged: int = 0
        # When a shrink check first saw each segment entirely free; None otherwise. Which
        # segment a page belongs to is only looked at in those checks, never on alloc/free,
        # so both stay a slice and an append (and on a GPU never wait for the device).
        self._empty_since: list[float | None] = [None] * g.num_segments
        # Segment start pages for `free_per_segment`, per committed count (built once each).
        self._bounds: dict[int, torch.Tensor] = {}
        self._allocated: torch.Tensor | None = (
            torch.zeros(g.cap_pages, dtype=torch.bool, device=self.device) if self.debug else None
        )
        # A census launched at the previous periodic check (see `free_per_segment`).
        self._census: tuple[int, torch.Tensor, Any] | None = None
        self._landing: dict[int, list[torch.Tensor]] = {}

    def _usable_range(self, seg: int) -> tuple[int, int]:
        """Pages of ``seg`` this allocator hands out (segment 0 loses the padding pages)."""
        start, end = self.geometry.segment_pages_range(seg)
        return max(start, self.first_page), end

    def _usable_count(self, seg: int) -> int:
        start, end = self._usable_range(seg)
        return max(0, end - start)

    def _usable_pages(self, seg: int) -> torch.Tensor:
        start, end = self._usable_range(seg)
        return torch.arange(start, max(start, end), dtype=torch.int64, device=self.device)

    @property
    def capacity_pages(self) -> int:
        """Pages this allocator can ever hand out (everything up to the cap)."""
        return self.geometry.cap_pages - self.first_page

    @property
    def num_free_committed(self) -> int:
        """Free pages that are backed right now (merged plus staged)."""
        return self.free_pages.shape[0] + self._num_staged

    def _withheld_committed(self) -> int:
        """Free pages of segments committed here but above the ceiling (another rank failed)."""
        extra = self.committed_segments - self.ceiling
        return (
            self._pages_below[self.committed_segments] - self._pages_below[self.ceiling]
            if (extra > 0)
            else 0
        )

    def _free_usable(self) -> int:
        return self.num_free_committed - self._withheld_committed()

    def available_pages(self) -> int:
        """Pages that can be handed out: free committed ones plus every page of the
        uncommitted segments below the ceiling (promised: commits follow)."""
        below = self._pages_below
        return self.num_free_committed + below[self.ceiling] - below[self.committed_segments]

    def withheld_pages(self) -> int:
        """Pages out of reach since a commit failed (0 normally)."""
        return self._pages_below[self.geometry.num_segments] - self._pages_below[self.ceiling]

    def used_count(self) -> int:
        """Pages handed out and not yet freed."""
        return self._pages_below[self.committed_segments] - self.num_free_committed

    def all_free_pages(self) -> torch.Tensor:
        """Every free committed page, staged frees included (for census checks: a page freed
        twice shows up twice here)."""
        if not self._staged:
            return self.free_pages
        return torch.cat((self.free_pages, *self._staged))

    def merge_and_sort_free(self) -> None:
        """Fold staged frees into the sorted ``free_pages``."""
        if not self._staged:
            return
        self.free_pages = _merge_sorted(self.free_pages, torch.cat(self._staged))
        self._staged = []
        self._num_staged = 0

    # -- growth ---------------------------------------------------------------------------

    def grow_to(self, num_segments: int) -> bool:
        """Commit segments until ``num_segments`` are committed (never beyond the ceiling).
        False if a commit failed (on any rank)."""
        num_segments = min(num_segments, self.ceiling)
        while self.committed_segments < num_segments:
            if not self._commit_next():
                return False
        return True

    def _commit_next(self) -> bool:
        """Commit the lowest uncommitted segment; every rank learns whether all succeeded."""
        seg = self.committed_segments
        ok = 1
        try:
            # Before any page of it is handed out: a failed commit hands out nothing.
            if self.on_commit is not None:
                self.on_commit(seg)
        except MemoryError as exc:
            ok = 0
            self.last_commit_error = str(exc) or type(exc).__name__
        all_ok = self.agree(ok)
        if ok:
            # Every page of a new top segment is above all existing free pages: stays sorted.
            self.free_pages = torch.cat((self.free_pages, self._usable_pages(seg)))
            self.committed_segments = seg + 1
            self.peak_committed_segments = max(self.peak_committed_segments, seg + 1)
            self.commits += 1
        if not all_ok:
            self.ceiling = min(self.ceiling, seg)
            self._failed_at = self.clock()
            self.commit_failures += 1
            if ok:
                self.last_commit_error = "a commit failed on another rank"
        return bool(all_ok)

    def ensure_free(self, n_pages: int) -> bool:
        """Commit the lowest uncommitted segments until ``n_pages`` free pages are backed.

        On True, ``free_pages[:n_pages]`` are valid (staged frees are merged if needed), so
        upstream's alloc kernels can read them directly. False if even the cap (or the ceiling
        after a failed commit) cannot hold them; then nothing is handed out.
        """
        if n_pages > self.available_pages():
            return False
        while self._free_usable() < n_pages:
            if not self._commit_next():
                return False
        if n_pages > self.free_pages.shape[0]:
            self.merge_and_sort_free()
        return True

    def backed_for(self, n_pages: int) -> bool:
        """Nothing to do for `prepare(n_pages)`: no ceiling stands and ``n_pages`` free pages
        are backed already (the common case: a few integer reads, every rank alike)."""
        return (
            self.ceiling == self.geometry.num_segments
            and self.free_pages.shape[0] + self._num_staged >= n_pages
        )

    def prepare(self, n_pages: int) -> bool:
        """Commit ahead so ``n_pages`` free pages are backed before they are asked for (as far
        as the cap allows); retry a failed commit once ``retry_s`` has passed. Call it at a
        point every rank reaches together (the scheduler loop). False if a commit failed."""
        if self.ceiling < self.geometry.num_segments:
            due = int(self.clock() - self._failed_at >= self.retry_s)
            if self.agree(due):
                self._retry_ceiling()
        # Even while a ceiling stands: segments released below it since (a shrink) are still
        # promised by available_pages(), so they are committed here, not mid-batch, where a
        # failure would leave upstream's allocation without the pages its admission counted.
        ok = self.ensure_free(min(n_pages, self.available_pages()))
        return ok and self.ceiling == self.geometry.num_segments

    def _retry_ceiling(self) -> None:
        seg = self.ceiling
        if self.committed_segments > seg:
            # Committed here already (another rank failed): only the others try again.
            ok = self.agree(1)
        else:
            self.ceiling = self.geometry.num_segments
            ok = self._commit_next()  # lowers the ceiling again on failure, with agreement
            if not ok:
                return
        if ok:
            self.ceiling = self.geometry.num_segments
        else:
            self._failed_at = self.clock()

    # -- alloc / free ---------------------------------------------------------------------

    def alloc(self, n_pages: int) -> torch.Tensor | None:
        """Take the ``n_pages`` lowest free page ids, growing as needed; None if over the cap."""
        free = self.free_pages
        if (
            0 <= n_pages <= free.shape[0]
            and self._allocated is None
            and self.committed_segments <= self.ceiling
        ):
            # The common case, kept to upstream's two slices: backed already, nothing withheld.
            self.free_pages = free[n_pages:]
            return free[:n_pages]
        if n_pages < 0:
            raise ValueError(f"cannot allocate {n_pages} pages")
        if not self.ensure_free(n_pages):
            return None
        out = self.free_pages[:n_pages]
        self.free_pages = self.free_pages[n_pages:]
        if self._allocated is not None and n_pages:
            if bool(self._allocated[out].any()):
                raise PageAccountingError("page handed out twice")
            self._allocated[out] = True
        return out

    def free(self, page_ids: torch.Tensor) -> None:
        """Return pages (each exactly once) to the free list."""
        if page_ids.numel() == 0:
            return
        page_ids = page_ids.to(device=self.device, dtype=torch.int64).reshape(-1)
        if self._allocated is not None:
            self._check_free(page_ids)
            self._allocated[page_ids] = False
        if self.lazy_merge:
            self._staged.append(page_ids.clone())  # caller may reuse its tensor
            self._num_staged += page_ids.numel()
        else:
            self.free_pages = _merge_sorted(self.free_pages, page_ids)

    def handed_out(self, n_pages: int, rest: torch.Tensor) -> None:
        """The caller handed out the ``n_pages`` lowest free pages itself (upstream's paged
        kernels read ``free_pages`` directly) and keeps ``rest`` (``free_pages[n_pages:]``)."""
        if self._allocated is not None and n_pages:
            taken = self.free_pages[:n_pages]
            if bool(self._allocated[taken].any()):
                raise PageAccountingError("page handed out twice")
            self._allocated[taken] = True
        self.free_pages = rest

    def _check_free(self, page_ids: torch.Tensor) -> None:
        assert self._allocated is not None
        lo, hi = int(page_ids.min()), int(page_ids.max())
        limit = self.committed_segments * self.geometry.segment_pages
        if lo < self.first_page or hi >= min(limit, self.geometry.cap_pages):
            raise PageAccountingError(
                f"freeing pages outside [{self.first_page}, {limit}): {lo}..{hi}"
            )
        if len(torch.unique(page_ids)) != len(page_ids):
            raise PageAccountingError("page freed twice in one call")
        if not bool(self._allocated[page_ids].all()):
            raise PageAccountingError("freeing a page that is not allocated (double free?)")

    def clear(self) -> None:
        """Forget all allocations; committed segments stay until `maybe_shrink` drops them."""
        committed = self.committed_segments
        self._init_state()
        self.free_pages = torch.cat([self._usable_pages(s) for s in range(committed)])

    # -- shrink ---------------------------------------------------------------------------

    def segments_holding(self, n_pages: int) -> int:
        """The fewest leading segments (at least ``min_committed_segments``) whose usable
        pages number ``n_pages`` or more (all segments if the pool is smaller)."""
        keep = bisect.bisect_left(self._pages_below, n_pages)
        return max(self.min_committed_segments, min(keep, self.geometry.num_segments))

    def first_page_of(self, seg: int) -> int:
        """Page id where segment ``seg`` starts (``cap_pages`` past the last segment)."""
        return min(seg * self.geometry.segment_pages, self.geometry.cap_pages)

    def free_per_segment(self, fresh: bool = True) -> list[int] | None:
        """Free pages in each committed segment, staged frees included (counted where they
        lie, not merged): one batched search over the sorted list and one scatter-add.

        ``fresh=False`` (the periodic check while serving) does not wait for the device: the
        census is launched into host memory and the census launched at the previous call is
        returned if it has landed and the committed count is unchanged, else None. On a GPU
        reading the counts at once would wait for all queued work (measured: 426 ms behind
        540 ms of queued kernels). A stale census only nominates segments; `maybe_shrink`
        checks a segment exactly before releasing it."""
        k = self.committed_segments
        bounds = self._bounds.get(k)
        if bounds is None:
            bounds = torch.tensor(
                [self._usable_range(seg)[0] for seg in range(k)] + [self.first_page_of(k)],
                dtype=torch.int64,
                device=self.device,
            )
            self._bounds[k] = bounds
        positions = torch.searchsorted(self.free_pages, bounds)
        counts = positions[1:] - positions[:-1]
        if self._staged:
            staged = torch.cat(self._staged) if len(self._staged) > 1 else self._staged[0]
            # Integer scatter, no sizing from the data: on a GPU nothing waits for the device.
            counts = counts.index_add(
                0, staged // self.geometry.segment_pages, torch.ones_like(staged)
            )
        if fresh or not self.delayed_census:
            self._census = None
            return counts.tolist()
        event = None
        landing = counts
        if self.device.type == "cuda":
            # Two pinned buffers per committed count, used in turn: allocating pinned memory
            # can itself synchronize, and the previous census is read from the other one.
            pair = self._landing.get(k)
            if pair is None:
                pair = [torch.empty(k, dtype=torch.int64, pin_memory=True) for _ in range(2)]
                self._landing[k] = pair
            pair.reverse()
            landing = pair[0]
            landing.copy_(counts, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        previous, self._census = self._census, (k, landing, event)
        if previous is None or previous[0] != k:
            return None
        if previous[2] is not None and not previous[2].query():
            return None
        return previous[1].tolist()

    def segments_to_keep(
        self,
        keep_free_pages: int = 0,
        now: float | None = None,
        hold_off_s: float | None = None,
        fresh: bool = True,
    ) -> int:
        """How many committed segments this rank needs: trailing segments seen entirely free
        for the hold-off can go, as long as ``keep_free_pages`` free pages stay backed."""
        now = self.clock() if now is None else now
        hold_off_s = self.hold_off_s if hold_off_s is None else hold_off_s
        free_counts = self.free_per_segment(fresh)
        if free_counts is None:  # no census has landed yet: nothing is known to be free
            return self.committed_segments
        # Only a trailing run of free segments can go, so the hold-off clocks are kept from the
        # top down to the first segment in use. One below it may keep a stale clock, but it is
        # released only after every check of a whole hold-off has walked through it and seen
        # it free (each segment above had to be free that long first).
        usable = self._usable_pages_in
        for seg in range(len(free_counts) - 1, -1, -1):
            if free_counts[seg] == usable[seg]:
                if self._empty_since[seg] is None:
                    self._empty_since[seg] = now
            else:
                self._empty_since[seg] = None
                break
        keep = self.committed_segments
        free = self._free_usable()
        while keep > self.min_committed_segments:
            seg = keep - 1
            since = self._empty_since[seg]
            if since is None or now - since < hold_off_s:
                break
            if seg < self.ceiling:
                if free - usable[seg] < keep_free_pages:
                    break
                free -= usable[seg]
            keep -= 1
        return keep

    def maybe_shrink(
        self,
        now: float | None = None,
        keep_free_pages: int = 0,
        hold_off_s: float | None = None,
        fresh: bool = True,
    ) -> int:
        """Release trailing committed segments that have been entirely free for ``hold_off_s``
        (default: the allocator's), keeping ``keep_free_pages`` free pages backed (the headroom
        `prepare` committed).

        Never releases below ``min_committed_segments`` (so never segment 0). Every rank
        shrinks to the same count (the largest any rank keeps). Returns how many segments were
        released here. With ``lazy_merge`` it also merges staged frees (always when fresh;
        while serving once they are an eighth of the sorted list): allocation takes the lowest
        merged pages, so high segments drain only if freed low pages come back into the list.
        """
        if fresh or self._num_staged * MERGE_STAGED_FRACTION >= self.free_pages.shape[0]:
            self.merge_and_sort_free()
        k = self.committed_segments
        # With no ceiling standing every rank has committed the same segments and holds the
        # same pages, so these shortcuts are taken by all ranks alike, without agreeing.
        if self.ceiling == self.geometry.num_segments:
            if k <= self.min_committed_segments:
                return 0
            if self.used_count() > self._pages_below[k - 1]:
                # The pages in use do not fit below the top segment, so it is in use: nothing
                # can go, and no census is needed to know it.
                self._empty_since[k - 1] = None
                self._census = None  # one launched before this is older than one interval
                return 0
            if not self.delayed_census and self._top_busy_whatever_is_staged():
                self._empty_since[k - 1] = None
                return 0
        keep = -self.agree(-self.segments_to_keep(keep_free_pages, now, hold_off_s, fresh))
        released = 0
        while self.committed_segments > keep:
            # A delayed census (from an earlier check) may be out of date: check exactly
            # (every rank holds the same allocations, so all of them agree).
            if not fresh and self.delayed_census and not self._top_entirely_free():
                self._empty_since[self.committed_segments - 1] = None
                break
            self._release_top(self.committed_segments - 1)
            released += 1
        return released

    def _sorted_free_in_top(self) -> int:
        """Free pages of the top segment in the sorted list (staged ones not counted); reads
        the search's result, so on a GPU it waits for the device."""
        start, _ = self._usable_range(self.committed_segments - 1)
        return self.free_pages.shape[0] - int(torch.searchsorted(self.free_pages, start))

    def _top_busy_whatever_is_staged(self) -> bool:
        """The top segment would be in use even if every staged free lay in it: one search of
        the sorted list, where the full census also counts the staged frees by segment (a
        quarter of its cost). Not where the census is delayed."""
        top = self.committed_segments - 1
        return self._sorted_free_in_top() + self._num_staged < self._usable_pages_in[top]

    def _top_entirely_free(self) -> bool:
        self.merge_and_sort_free()
        return self._sorted_free_in_top() == self._usable_pages_in[self.committed_segments - 1]

    def _release_top(self, seg: int) -> None:
        # Its pages are all free, hence in the free list; being the top segment they are its tail.
        self.merge_and_sort_free()
        if self._sorted_free_in_top() != self._usable_pages_in[seg]:
            raise PageAccountingError(f"segment {seg} is not entirely free")
        cut = self.free_pages.shape[0] - self._usable_pages_in[seg]
        kept, dropped = self.free_pages[:cut], self.free_pages[cut:]
        # Pages leave the free list before the memory goes, so none can point at released memory.
        self.free_pages = kept
        self.committed_segments = seg
        if self.on_release is not None:
            try:
                self.on_release(seg)
            except BaseException:
                self.free_pages = torch.cat((kept, dropped))
                self.committed_segments = seg + 1
                raise
        self._empty_since[seg] = None
        self.releases += 1

    # -- checks ---------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Assert internal consistency (for tests and idle diagnostics; O(capacity))."""
        for problem in self.accounting_problems():
            raise AssertionError(problem)

    def accounting_problems(self) -> list[str]:
        """Everything inconsistent in the page accounting; empty when healthy."""
        g = self.geometry
        k = self.committed_segments
        problems: list[str] = []
        if not 1 <= self.min_committed_segments <= k <= g.num_segments:
            problems.append(f"{k} committed segments outside [{self.min_committed_segments}, ...]")
        if self.peak_committed_segments < k:
            problems.append("peak below committed")
        free = self.free_pages
        if free.dtype != torch.int64:
            problems.append(f"free_pages dtype {free.dtype}")
        if len(free) > 1 and not bool((free[1:] > free[:-1]).all()):
            problems.append("free_pages not sorted/unique")
        every_free = self.all_free_pages()
        if len(every_free) != len(free) + self._num_staged:
            problems.append("staged count mismatch")
        duplicates = len(every_free) - len(torch.unique(every_free))
        if duplicates:
            problems.append(f"{duplicates} page(s) free twice")
        limit = self.first_page_of(k)
        if len(every_free):
            if int(every_free.min()) < self.first_page:
                problems.append("padding page in the free list")
            if int(every_free.max()) >= limit:
                problems.append("free page in an uncommitted segment")
        if not duplicates:
            for seg, free_count in enumerate(self.free_per_segment()):
                if free_count > self._usable_count(seg):
                    problems.append(
                        f"segment {seg}: {free_count} free of {self._usable_count(seg)}"
                    )
        if self.used_count() < 0:
            problems.append(f"{-self.used_count()} more pages free than committed")
        if self._allocated is not None:
            if len(every_free) and bool(self._allocated[every_free].any()):
                problems.append("free page is also allocated")
            if int(self._allocated.sum()) != self.used_count():
                problems.append("allocated bitmap disagrees with the free list")
        return problems
