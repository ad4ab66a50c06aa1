"""A page allocator that commits segments as pages are needed and gives back trailing
ones.

Its verbs are upstream's: `alloc` takes the lowest free page ids, `free` returns them.
Below them: growth (`prepare` ahead of need, `ensure_free` on demand), the growth
ceiling after a failed commit (`growth.GrowthCeiling`), and the shrink of trailing
segments free for a hold-off (`shrink.HoldOffClocks`, judged on a `census.Census`). The
free list is `free_list.FreeList`; under upstream's debug switch a `ledger.PageLedger`
checks every call.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from sglang.srt.mem_cache.segmented.census import Census, SegmentPages
from sglang.srt.mem_cache.segmented.free_list import FreeList
from sglang.srt.mem_cache.segmented.geometry import SegmentGeometry
from sglang.srt.mem_cache.segmented.growth import GrowthCeiling
from sglang.srt.mem_cache.segmented.invariants import accounting_problems
from sglang.srt.mem_cache.segmented.ledger import PageAccountingError, PageLedger
from sglang.srt.mem_cache.segmented.shrink import HoldOffClocks

__all__ = ["Agree", "SegmentedPageAllocator"]

# While serving, staged frees are merged into the sorted free list at a shrink check
# once they number 1/this of it: merging is O(free pages), and between merges allocation
# reaches at most that many pages further up than with the list kept sorted.
MERGE_STAGED_FRACTION = 8

Agree = Callable[[int], int]
"""The minimum of an int over every rank that shares the pool's decisions, called at the same
point on every rank (a single rank: the identity)."""


def _agree_alone(value: int) -> int:
    return value


class SegmentedPageAllocator:
    """Page allocator that commits segments on demand and releases trailing empty ones.

    Pages live in ``[first_page, cap_pages)``. Committed segments are always a prefix
    ``[0, committed_segments)``: growth commits the lowest uncommitted segment,
    shrinking releases the highest committed one. ``free_pages`` is a sorted int64
    tensor of free pages in committed segments (like upstream's); allocation takes the
    lowest ids so load packs into low segments and high ones drain.

    ``on_commit(seg)`` backs a segment's memory before any of its pages is handed out (a
    MemoryError is a failed commit: the ceiling drops); ``on_release(seg)`` gives it
    back once its pages left the free list. `suspend` gives back every segment, the
    first too, through ``on_suspend()``, and nothing is committed until `resume` (RL's
    memory release).

    Several ranks (tensor parallelism) must commit and release the same segments. Every
    decision that could differ between them (a commit's outcome, how far to shrink,
    whether to retry) goes through ``agree``. Allocation state is otherwise identical on
    all ranks, so they stay in lock-step.

    ``lazy_merge=True`` mirrors upstream's ``need_sort``: freed pages are staged and
    merged into ``free_pages`` only when an allocation runs short and at shrink checks;
    otherwise every free merges, O(free pages) each.
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
        on_suspend: Callable[[], None] | None = None,
        agree: Agree | None = None,
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
        self.geometry = geometry
        self.first_page = first_page
        self.min_committed_segments = min_committed_segments
        self.on_commit = on_commit
        self.on_release = on_release
        self.on_suspend = on_suspend
        self.agree: Agree = agree or _agree_alone
        self.lazy_merge = lazy_merge
        self.debug = debug
        self.device = torch.device(device)
        self.pages = SegmentPages(geometry, first_page, self.device)
        self.clocks = HoldOffClocks(geometry.num_segments, hold_off_s)
        self.growth = GrowthCeiling(geometry.num_segments, retry_s, clock)
        self.census = Census(self.pages)
        self.committed_segments = 0
        self.peak_committed_segments = 0
        self.commits = 0
        self.releases = 0
        self._reset_pages()
        self.grow_to(min_committed_segments)
        if self.committed_segments < min_committed_segments:
            raise MemoryError(
                f"cannot commit the first {min_committed_segments} segment(s): "
                f"{self.last_commit_error}"
            )

    def _reset_pages(self) -> None:
        self.free_list = FreeList(self.device, staged=self.lazy_merge)
        self.ledger = (
            PageLedger(self.geometry.cap_pages, self.device) if self.debug else None
        )
        self.clocks.reset()
        self.census.reset()

    # -- what the parts hold, under the allocator's names
    # ---------------------------------

    @property
    def free_pages(self) -> torch.Tensor:
        """Free committed pages, sorted (staged frees not included)."""
        return self.free_list.pages

    @property
    def clock(self) -> Callable[[], float]:
        return self.growth.clock

    @clock.setter
    def clock(self, value: Callable[[], float]) -> None:
        self.growth.clock = value

    @property
    def ceiling(self) -> int:
        """Segments at or above it are withheld after a failed commit."""
        return self.growth.ceiling

    @ceiling.setter
    def ceiling(self, value: int) -> None:
        self.growth.ceiling = value

    @property
    def commit_failures(self) -> int:
        return self.growth.failures

    @property
    def last_commit_error(self) -> str | None:
        return self.growth.last_error

    @property
    def retry_s(self) -> float:
        return self.growth.retry_s

    @retry_s.setter
    def retry_s(self, value: float) -> None:
        self.growth.retry_s = value

    @property
    def hold_off_s(self) -> float:
        return self.clocks.hold_off_s

    @hold_off_s.setter
    def hold_off_s(self, value: float) -> None:
        self.clocks.hold_off_s = value

    @property
    def delayed_census(self) -> bool:
        """The periodic census is delayed (a GPU; tests turn it on for the CPU)."""
        return self.census.delayed

    @delayed_census.setter
    def delayed_census(self, value: bool) -> None:
        self.census.delayed = value

    @property
    def _num_staged(self) -> int:
        return self.free_list.num_staged

    # -- counts
    # -----------------------------------------------------------------------------

    @property
    def capacity_pages(self) -> int:
        """Pages this allocator can ever hand out (everything up to the cap)."""
        return self.geometry.cap_pages - self.first_page

    @property
    def num_free_committed(self) -> int:
        """Free pages that are backed right now (merged plus staged)."""
        return self.free_list.count

    def _withheld_committed(self) -> int:
        """Free pages of segments committed here but above the ceiling (another rank
        failed)."""
        below, k, ceiling = (
            self.pages.below,
            self.committed_segments,
            self.growth.ceiling,
        )
        return below[k] - below[ceiling] if k > ceiling else 0

    def _free_usable(self) -> int:
        return self.free_list.count - self._withheld_committed()

    def available_pages(self) -> int:
        """Pages that can be handed out: free committed ones plus every page of the
        uncommitted segments below the ceiling (promised: commits follow)."""
        below = self.pages.below
        return (
            self.free_list.count
            + below[self.growth.ceiling]
            - below[self.committed_segments]
        )

    def backed_free_pages(self) -> int:
        """Free pages that can be handed out without a commit (backed, below the
        ceiling)."""
        return self._free_usable()

    @property
    def committed_page_limit(self) -> int:
        """Page id past the last committed segment: committed segments are a prefix, so
        every page below it is backed and every page from it on is not."""
        return self.first_page_of(self.committed_segments)

    def withheld_pages(self) -> int:
        """Pages out of reach since a commit failed (0 normally)."""
        below = self.pages.below
        return below[self.geometry.num_segments] - below[self.growth.ceiling]

    def used_count(self) -> int:
        """Pages handed out and not yet freed."""
        return self.pages.below[self.committed_segments] - self.free_list.count

    def all_free_pages(self) -> torch.Tensor:
        """Every free committed page, staged frees included (for census checks: a page
        freed twice shows up twice here)."""
        return self.free_list.all()

    def merge_and_sort_free(self) -> None:
        """Fold staged frees into the sorted ``free_pages``."""
        self.free_list.merge()

    # -- growth
    # -----------------------------------------------------------------------------

    def grow_to(self, num_segments: int) -> bool:
        """Commit segments until ``num_segments`` are committed (never beyond the
        ceiling). False if a commit failed (on any rank)."""
        num_segments = min(num_segments, self.growth.ceiling)
        while self.committed_segments < num_segments:
            if not self._commit_next():
                return False
        return True

    def _commit_next(self) -> bool:
        """Commit the lowest uncommitted segment; every rank learns whether all
        succeeded."""
        seg = self.committed_segments
        ok = 1
        try:
            # Before any page of it is handed out: a failed commit hands out nothing.
            if self.on_commit is not None:
                self.on_commit(seg)
        except MemoryError as exc:
            ok = 0
            self.growth.last_error = str(exc) or type(exc).__name__
        all_ok = self.agree(ok)
        if ok:
            # Every page of a new top segment is above all existing free pages: stays
            # sorted.
            self.free_list.append_top(self.pages.ids(seg))
            self.committed_segments = seg + 1
            self.peak_committed_segments = max(self.peak_committed_segments, seg + 1)
            self.commits += 1
        if not all_ok:
            self.growth.fail(seg)
            if ok:
                self.growth.last_error = "a commit failed on another rank"
        return bool(all_ok)

    def ensure_free(self, n_pages: int) -> bool:
        """Commit the lowest uncommitted segments until ``n_pages`` free pages are
        backed.

        On True, ``free_pages[:n_pages]`` are valid (staged frees are merged if needed),
        so upstream's alloc kernels can read them directly. False if even the cap (or
        the ceiling after a failed commit) cannot hold them; then nothing is handed out.
        """
        if n_pages > self.available_pages():
            return False
        while self._free_usable() < n_pages:
            if not self._commit_next():
                return False
        if n_pages > self.free_list.pages.shape[0]:
            self.free_list.merge()
        return True

    def backed_for(self, n_pages: int) -> bool:
        """Nothing to do for `prepare(n_pages)`: no ceiling stands and ``n_pages`` free
        pages are backed already (the common case: a few integer reads, every rank
        alike)."""
        return not self.growth.standing and self.free_list.count >= n_pages

    def prepare(self, n_pages: int) -> bool:
        """Commit ahead so ``n_pages`` free pages are backed before they are asked for
        (as far as the cap allows); retry a failed commit once ``retry_s`` has passed.
        Call it at a point every rank reaches together (the scheduler loop). False if a
        commit failed."""
        if self.growth.standing and self.agree(int(self.growth.retry_due())):
            self._retry_ceiling()
        # Even while a ceiling stands: segments released below it since (a shrink) are
        # still promised by available_pages(), so they are committed here, not
        # mid-batch, where a failure would leave upstream's allocation without the pages
        # its admission counted.
        ok = self.ensure_free(min(n_pages, self.available_pages()))
        return ok and not self.growth.standing

    def _retry_ceiling(self) -> None:
        if self.committed_segments > self.growth.ceiling:
            # Committed here already (another rank failed): only the others try again.
            ok = self.agree(1)
        else:
            self.growth.lift()
            ok = (
                self._commit_next()
            )  # lowers the ceiling again on failure, with agreement
            if not ok:
                return
        if ok:
            self.growth.lift()
        else:
            self.growth.postpone()

    # -- alloc / free
    # -----------------------------------------------------------------------

    def alloc(self, n_pages: int) -> torch.Tensor | None:
        """Take the ``n_pages`` lowest free page ids, growing as needed; None if over
        the cap."""
        free = self.free_list.pages
        if (
            0 <= n_pages <= free.shape[0]
            and self.ledger is None
            and self.committed_segments <= self.growth.ceiling
        ):
            # The common case, kept to upstream's two slices: backed already, nothing
            # withheld.
            self.free_list.pages = free[n_pages:]
            return free[:n_pages]
        if n_pages < 0:
            raise ValueError(f"cannot allocate {n_pages} pages")
        if not self.ensure_free(n_pages):
            return None
        out = self.free_list.take(n_pages)
        if self.ledger is not None:
            self.ledger.taken(out)
        return out

    def free(self, page_ids: torch.Tensor) -> None:
        """Return pages (each exactly once) to the free list."""
        if page_ids.numel() == 0:
            return
        page_ids = page_ids.to(device=self.device, dtype=torch.int64).reshape(-1)
        if self.ledger is not None:
            limit = self.committed_segments * self.geometry.segment_pages
            self.ledger.freed(page_ids, self.first_page, limit)
        self.free_list.put(page_ids)

    def handed_out(self, n_pages: int, rest: torch.Tensor) -> None:
        """The caller handed out the ``n_pages`` lowest free pages itself (upstream's
        paged kernels read ``free_pages`` directly) and keeps ``rest``
        (``free_pages[n_pages:]``)."""
        if self.ledger is not None and n_pages:
            self.ledger.taken(self.free_list.pages[:n_pages])
        self.free_list.pages = rest

    def clear(self) -> None:
        """Forget all allocations; committed segments stay until `maybe_shrink` drops
        them."""
        committed = self.committed_segments
        self._reset_pages()
        ids = [self.pages.ids(s) for s in range(committed)]
        empty = torch.empty(0, dtype=torch.int64, device=self.device)
        self.free_list.reset(torch.cat(ids) if ids else empty)

    # -- shrink
    # -----------------------------------------------------------------------------

    def segments_holding(self, n_pages: int) -> int:
        """The fewest leading segments (at least ``min_committed_segments``) whose
        usable pages number ``n_pages`` or more (all segments if the pool is
        smaller)."""
        return self.pages.segments_holding(n_pages, self.min_committed_segments)

    def first_page_of(self, seg: int) -> int:
        """Page id where segment ``seg`` starts (``cap_pages`` past the last
        segment)."""
        return self.pages.first_page_of(seg)

    def free_per_segment(self, fresh: bool = True) -> list[int] | None:
        """Free pages in each committed segment (`census.Census.free_per_segment`)."""
        return self.census.free_per_segment(
            self.free_list, self.committed_segments, fresh
        )

    def segments_to_keep(
        self,
        keep_free_pages: int = 0,
        now: float | None = None,
        hold_off_s: float | None = None,
        fresh: bool = True,
    ) -> int:
        """How many committed segments this rank needs: trailing segments seen entirely
        free for the hold-off can go, as long as ``keep_free_pages`` free pages stay
        backed."""
        now = self.clock() if now is None else now
        hold_off_s = self.clocks.hold_off_s if hold_off_s is None else hold_off_s
        free_counts = self.free_per_segment(fresh)
        if free_counts is None:  # no census has landed yet: nothing is known to be free
            return self.committed_segments
        usable = self.pages.count
        self.clocks.observe(free_counts, usable, now)
        keep = self.committed_segments
        free = self._free_usable()
        while keep > self.min_committed_segments:
            seg = keep - 1
            if not self.clocks.expired(seg, now, hold_off_s):
                break
            if seg < self.growth.ceiling:
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
        """Release trailing committed segments that have been entirely free for
        ``hold_off_s`` (default: the allocator's), keeping ``keep_free_pages`` free
        pages backed (the headroom `prepare` committed).

        Never releases below ``min_committed_segments`` (so never segment 0). Every rank
        shrinks to the same count (the largest any rank keeps). Returns how many
        segments were released here. With ``lazy_merge`` it also merges staged frees
        (always when fresh; while serving once they are an eighth of the sorted list):
        allocation takes the lowest merged pages, so high segments drain only if freed
        low pages come back into the list.
        """
        free = self.free_list
        if fresh or free.num_staged * MERGE_STAGED_FRACTION >= free.pages.shape[0]:
            free.merge()
        k = self.committed_segments
        # With no ceiling standing every rank has committed the same segments and holds
        # the same pages, so these shortcuts are taken by all ranks alike, without
        # agreeing.
        if not self.growth.standing:
            if k <= self.min_committed_segments:
                return 0
            if self.used_count() > self.pages.below[k - 1]:
                # The pages in use do not fit below the top segment, so it is in use:
                # nothing can go, and no census is needed to know it.
                self.clocks.in_use(k - 1)
                # A census launched before this is older than one interval.
                self.census.forget()
                return 0
            if not self.census.delayed and self._top_busy_whatever_is_staged():
                self.clocks.in_use(k - 1)
                return 0
        keep = -self.agree(
            -self.segments_to_keep(keep_free_pages, now, hold_off_s, fresh)
        )
        released = 0
        while self.committed_segments > keep:
            # A delayed census (from an earlier check) may be out of date: check exactly
            # (every rank holds the same allocations, so all of them agree).
            if not fresh and self.census.delayed and not self._top_entirely_free():
                self.clocks.in_use(self.committed_segments - 1)
                break
            self._release_top(self.committed_segments - 1)
            released += 1
        return released

    def _sorted_free_in_top(self) -> int:
        """Free pages of the top segment in the sorted list (staged ones not counted);
        reads the search's result, so on a GPU it waits for the device."""
        start, _ = self.pages.range(self.committed_segments - 1)
        return self.free_list.sorted_at_or_above(start)

    def _top_busy_whatever_is_staged(self) -> bool:
        """The top segment would be in use even if every staged free lay in it: one
        search of the sorted list, where the full census also counts the staged frees by
        segment (a quarter of its cost). Not where the census is delayed."""
        top = self.committed_segments - 1
        return (
            self._sorted_free_in_top() + self.free_list.num_staged
            < self.pages.count[top]
        )

    def _top_entirely_free(self) -> bool:
        self.free_list.merge()
        return (
            self._sorted_free_in_top() == self.pages.count[self.committed_segments - 1]
        )

    def _release_top(self, seg: int) -> None:
        # Its pages are all free, hence in the free list; being the top segment they are
        # its tail.
        self.free_list.merge()
        if self._sorted_free_in_top() != self.pages.count[seg]:
            raise PageAccountingError(f"segment {seg} is not entirely free")
        # Pages leave the free list before the memory goes, so none can point at
        # released memory.
        kept, dropped = self.free_list.cut_top(self.pages.count[seg])
        self.committed_segments = seg
        if self.on_release is not None:
            try:
                self.on_release(seg)
            except BaseException:
                self.free_list.pages = torch.cat((kept, dropped))
                self.committed_segments = seg + 1
                raise
        self.clocks.in_use(seg)
        self.releases += 1

    # -- suspend (RL's release of memory occupation)
    # ------------------------------------------

    @property
    def suspended(self) -> bool:
        return self.growth.suspended

    def suspend(self) -> int:
        """Give back every committed segment, the first (the padding page's) too:
        nothing may be allocated (the caller flushed the cache). Until `resume` every
        page is withheld, so the caller queues work as for a full pool, and nothing is
        committed. Every rank suspends together (the same state everywhere: no
        agreement). Returns the segments given back."""
        self.free_list.merge()
        if self.used_count():
            raise PageAccountingError(
                f"{self.used_count()} pages are in use: flush the cache before suspending"
            )
        released = self.committed_segments
        self._reset_pages()
        self.committed_segments = 0
        self.growth.suspend()
        if released and self.on_suspend is not None:
            self.on_suspend()
        self.releases += released
        return released

    def resume(self) -> None:
        """Open the pool again; segments are committed as pages are asked for (the first
        one with its padding page zeroed, by ``on_commit``)."""
        self.growth.resume()

    # -- checks
    # -----------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Assert internal consistency (for tests and idle diagnostics; O(capacity))."""
        for problem in self.accounting_problems():
            raise AssertionError(problem)

    def accounting_problems(self) -> list[str]:
        """Everything inconsistent in the page accounting; empty when healthy."""
        return accounting_problems(self)
