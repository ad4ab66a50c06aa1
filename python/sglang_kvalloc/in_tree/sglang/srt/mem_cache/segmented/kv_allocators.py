"""Upstream's token (page 1) and paged (page > 1) allocators over a
`SegmentedPageAllocator`.

Upstream's own `free_pages` tensor is kept equal to the core's sorted free list of
committed pages, so upstream's extend/decode kernels read it as before. The scheduler
hooks drive the segments: `scheduler_step` commits ahead of each iteration (so
allocation rarely commits) and gives back trailing segments empty for the hold-off;
`idle_step` runs the idle policy. Memory is never released inside a free.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

import torch

from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.segmented import idle_eviction
from sglang.srt.mem_cache.segmented.allocator import SegmentedPageAllocator
from sglang.srt.mem_cache.segmented.buffers import SegmentedBuffers
from sglang.srt.mem_cache.segmented.events import SegmentEvents
from sglang.srt.mem_cache.segmented.runs import split_runs_at_segment_starts
from sglang.srt.mem_cache.segmented.runtime import RUNTIME
from sglang.srt.utils import get_bool_env_var, get_num_new_pages

if TYPE_CHECKING:
    from sglang.srt.mem_cache.base_prefix_cache import BasePrefixCache
    from sglang.srt.mem_cache.memory_pool import KVCache

logger = logging.getLogger(__name__)

# Shrink checks (and, with several ranks, their agreement) every this many scheduler
# iterations: counted, not timed, so every rank checks in the same iteration.
SYNC_EVERY_ITERATIONS = 8
# While busy the shrink check (a census of the free list) runs every this many iterations: a
# fraction of a second at serving step times, against a 5 s hold-off.
SHRINK_CHECK_EVERY_ITERATIONS = 32


class SegmentedAllocatorMixin:
    """Upstream's allocator API over a `SegmentedPageAllocator` (see the module docstring)."""

    page_size: int
    free_pages: torch.Tensor
    _segments: SegmentedPageAllocator
    # Under PD, where a transfer engine registers each segment: no run of slots handed out
    # crosses a segment start (`pd_transfer`; page_size 1 only).
    split_runs_at_segments = False

    def _make_segments(self, kvcache: KVCache, device: str, page_size: int) -> None:
        buffers: SegmentedBuffers = kvcache.segmented_buffers
        self._buffers = buffers
        self._events = events = SegmentEvents(buffers, page_size)
        self._segments = SegmentedPageAllocator(
            buffers.geometry,
            first_page=1,
            hold_off_s=RUNTIME.settings.hold_off_s,
            on_commit=events.on_commit,
            on_release=events.on_release,
            on_suspend=events.on_suspend,
            agree=RUNTIME.settings.agree,
            # Like upstream's need_sort: frees are staged in O(1) and merged when an
            # allocation runs short or at a shrink check, not on every free.
            lazy_merge=True,
            # Upstream's allocator debug switch (read once per allocator, as upstream does).
            debug=get_bool_env_var("SGLANG_DEBUG_MEMORY_POOL"),
            # Upstream's kernels read free_pages where the pool lives (the GPU there).
            device=device,
        )
        events.committing_ahead = False
        self._iteration = 0
        self._busy_at = time.monotonic()
        self._idle_policy_done = False

    @property
    def mid_batch_commits(self) -> int:
        """Segments committed inside an allocation, not ahead of the iteration."""
        return self._events.mid_batch_commits

    def _sync(self) -> None:
        self.free_pages = self._segments.free_pages

    def available_size(self) -> int:
        # Uncommitted segments count: the scheduler may plan up to the cap (below the ceiling
        # a failed commit sets), and commits follow.
        return self._segments.available_pages() * self.page_size

    def committed_available_size(self) -> int:
        """Tokens that can be handed out without a commit (PD decode admits by these)."""
        return self._segments.backed_free_pages() * self.page_size

    def committed_slot_limit(self) -> int:
        """Slot id past the committed memory: every slot a transfer writes lies below it."""
        return self._segments.committed_page_limit * self.page_size

    def withheld_size(self) -> int:
        """Tokens out of reach since a commit failed; upstream's leak identity adds them."""
        return self._segments.withheld_pages() * self.page_size

    def get_all_free_pages(self) -> torch.Tensor:
        # Staged frees included: upstream's debug duplicate check and the scheduler's
        # SGLANG_CHECK_KV_PAGE_INVARIANTS census must see a page freed twice.
        return self._segments.all_free_pages()

    def merge_and_sort_free(self) -> None:
        self._segments.merge_and_sort_free()
        self._sync()

    def verify_byte_accounting(self) -> list[str]:
        """Upstream's idle diagnostic: the core's page accounting, under upstream's
        allocator debug switch only (it is O(capacity) and the idle loop calls it
        often)."""
        if not self._segments.debug:
            return []
        return self._segments.accounting_problems()

    def scheduler_step(self, demand_tokens: int) -> None:
        """Top of every scheduler iteration (every rank together): commit ahead so the
        iteration's allocations find backed pages, and every few iterations give back
        trailing segments empty for the hold-off (keeping that headroom)."""
        # Runs every scheduler iteration: the common path is two integer tests.
        self._iteration += 1
        seg = self._segments
        if (
            seg.suspended
        ):  # memory occupation released: nothing is committed until resumed
            return
        pages = -(-demand_tokens // self.page_size)
        events = self._events
        events.last_demand_tokens = demand_tokens
        prepared = not seg.backed_for(pages)
        if prepared:
            events.committing_ahead = True
            try:
                seg.prepare(pages)
            finally:
                events.committing_ahead = False
        released = 0
        checked = self._iteration % SHRINK_CHECK_EVERY_ITERATIONS == 0
        if checked:
            # Not fresh: on a GPU the census would wait for the running batch.
            released = seg.maybe_shrink(keep_free_pages=pages, fresh=False)
        if prepared or checked:  # the free list may have grown, shrunk or been merged
            self._sync()
        if prepared or released:
            events.log_commit_failure(seg)

    def note_busy(self) -> None:
        """The scheduler has work: the idle policy waits for a full hold-off after it."""
        self._busy_at = time.monotonic()
        self._idle_policy_done = False

    def idle_step(self, tree_cache: BasePrefixCache) -> bool:
        """On a fully idle iteration (every rank): once idle for the hold-off, evict
        cached KV in trailing segments, then LRU down to the retained budget, and give
        the emptied segments back at once. Runs once per idle period; True when it ran."""
        seg = self._segments
        if self._iteration % SYNC_EVERY_ITERATIONS or seg.suspended:
            return False
        due = (
            not self._idle_policy_done
            and time.monotonic() - self._busy_at >= seg.hold_off_s
        )
        if not seg.agree(int(due)):
            return False
        self._idle_policy_done = True
        RUNTIME.backings.trim_spares()  # pre-created handles hold memory too
        self.release_cache_above_retained(
            tree_cache, f"idle for {seg.hold_off_s:.1f} s"
        )
        return True

    def release_cache_above_retained(
        self, tree_cache: BasePrefixCache, why: str
    ) -> int:
        """Evict the cached KV no request holds, first in the segments above what the
        retained tokens (``--kv-idle-cache-tokens``) need, then least recently used down
        to them, and give the segments that empties back now. Every rank together.
        Returns the segments released."""
        seg = self._segments
        retain = RUNTIME.settings.idle_cache_tokens
        keep = seg.segments_holding(-(-retain // self.page_size))
        boundary_slot = seg.first_page_of(keep) * self.page_size
        before = self._buffers.committed_bytes
        by_location = idle_eviction.evict_at_or_above(tree_cache, boundary_slot)
        by_lru = idle_eviction.evict_lru_down_to(tree_cache, retain)
        released = seg.maybe_shrink(hold_off_s=0.0)
        self._sync()
        if by_location or by_lru or released:
            logger.info(
                "%s: evicted %d cached tokens at or above slot %d and %d more (LRU, %d "
                "retained); released %d segments: %.2f -> %.2f MB committed.",
                why[:1].upper() + why[1:],
                by_location,
                boundary_slot,
                by_lru,
                retain,
                released,
                before / 1e6,
                self._buffers.committed_bytes / 1e6,
            )
        return released

    def suspend(self) -> int:
        """RL's memory release: every segment given back, the first too; every page
        withheld (requests queue) until `resume`. Returns the segments given back."""
        released = self._segments.suspend()
        self._sync()
        return released

    def resume(self) -> None:
        """Open again: segments are committed as requests need them."""
        self._segments.resume()
        self._sync()

    def maybe_shrink_now(self) -> int:
        """Release every trailing empty segment at once (the idle policy's release)."""
        released = self._segments.maybe_shrink(hold_off_s=0.0)
        self._sync()
        return released

    def maybe_shrink(self, keep_free_tokens: int = 0) -> int:
        """Release trailing segments empty for the hold-off (every rank the same count)."""
        released = self._segments.maybe_shrink(
            keep_free_pages=keep_free_tokens // self.page_size
        )
        self._sync()
        return released

    def segment_stats(self) -> dict[str, Any]:
        seg = self._segments
        geometry = self._buffers.geometry
        return {
            "segment_tokens": geometry.segment_tokens,
            "total_segments": geometry.num_segments,
            "committed_segments": seg.committed_segments,
            "peak_committed_segments": seg.peak_committed_segments,
            "committed_bytes": self._buffers.committed_bytes,
            "reserved_bytes": sum(b.reserved_bytes for b in self._buffers.backings),
            "used_tokens": seg.used_count() * self.page_size,
            "withheld_tokens": seg.withheld_pages() * self.page_size,
            "commits": seg.commits,
            "releases": seg.releases,
            "commit_failures": seg.commit_failures,
            "mid_batch_commits": self.mid_batch_commits,
            # JSON has no infinity (upstream's /server_info answered 500): null means never.
            "hold_off_s": seg.hold_off_s if math.isfinite(seg.hold_off_s) else None,
        }


class SegmentedTokenToKVPoolAllocator(SegmentedAllocatorMixin, TokenToKVPoolAllocator):
    """page_size 1: slot ids are page ids."""

    def __init__(
        self,
        size: int,
        dtype: torch.dtype,
        device: str,
        kvcache: KVCache,
        need_sort: bool,
    ) -> None:
        self._make_segments(kvcache, device, 1)
        super().__init__(size, dtype, device, kvcache, need_sort)

    def clear(self) -> None:
        self._segments.clear()
        self._sync()
        self.free_group = None
        self.release_pages = torch.empty((0,), dtype=torch.int64, device=self.device)

    def alloc(self, need_size: int) -> torch.Tensor | None:
        out = self._segments.alloc(need_size)
        self._sync()
        if out is not None and self.split_runs_at_segments:
            out = split_runs_at_segment_starts(
                out, self._buffers.geometry.segment_pages
            )
        return out

    def free(self, free_index: torch.Tensor) -> None:
        if free_index.numel() == 0:
            return
        if self.free_group is not None:
            self.free_group.append(self._copy_for_free_group(free_index))
            return
        self._segments.free(free_index.to(torch.int64))
        self._sync()


class SegmentedPagedTokenToKVPoolAllocator(
    SegmentedAllocatorMixin, PagedTokenToKVPoolAllocator
):
    """page_size > 1: upstream's extend/decode kernels over the core's committed free list."""

    def __init__(
        self,
        size: int,
        page_size: int,
        dtype: torch.dtype,
        device: str,
        kvcache: KVCache,
        need_sort: bool,
    ) -> None:
        self._make_segments(kvcache, device, page_size)
        super().__init__(size, page_size, dtype, device, kvcache, need_sort)

    def clear(self) -> None:
        super().clear()
        self._segments.clear()
        self._sync()

    def alloc(self, need_size: int) -> torch.Tensor | None:
        if self.debug_mode:
            assert need_size % self.page_size == 0, (
                "The allocation size should be page-aligned"
            )
        pages = self._segments.alloc(need_size // self.page_size)
        self._sync()
        if pages is None:
            return None
        return (
            pages[:, None] * self.page_size
            + torch.arange(self.page_size, device=self.device)
        ).reshape(-1)

    def _upstream_kernels_fit(self, max_new_pages: int) -> bool:
        """The pages upstream's kernels may take are merged and backed already (nothing
        withheld): they run on the core's free list as it is, without counting the new
        pages first (a CPU sum over the batch that upstream's call does anyway)."""
        seg = self._segments
        free = self.free_pages = seg.free_pages
        return (
            max_new_pages <= free.shape[0]
            and seg.committed_segments <= seg.ceiling
            and not seg.debug
        )

    def _adopt_upstream_take(self, out: torch.Tensor | None) -> torch.Tensor | None:
        """Upstream's kernels took the lowest free pages by slicing `free_pages`: the
        core adopts what they left."""
        seg = self._segments
        rest = self.free_pages
        seg.handed_out(seg.free_pages.shape[0] - rest.shape[0], rest)
        return out

    def alloc_extend(
        self,
        prefix_lens: torch.Tensor,
        prefix_lens_cpu: torch.Tensor,
        seq_lens: torch.Tensor,
        seq_lens_cpu: torch.Tensor,
        last_loc: torch.Tensor,
        extend_num_tokens: int,
        num_new_pages: int | None = None,
    ) -> torch.Tensor | None:
        # Upstream's own bound on the new pages (each request grows by under extend/page + 1).
        bound = extend_num_tokens // self.page_size + prefix_lens.shape[0] + 1
        if not self._upstream_kernels_fit(bound):
            # Not known to be backed: count the new pages exactly and commit them first.
            if num_new_pages is None:
                num_new_pages = get_num_new_pages(
                    seq_lens=seq_lens_cpu,
                    page_size=self.page_size,
                    prefix_lens=prefix_lens_cpu,
                )
            if not self._segments.ensure_free(num_new_pages):
                return None
            self._sync()
        out = super().alloc_extend(
            prefix_lens,
            prefix_lens_cpu,
            seq_lens,
            seq_lens_cpu,
            last_loc,
            extend_num_tokens,
            num_new_pages=num_new_pages,
        )
        return self._adopt_upstream_take(out)

    def alloc_decode(
        self, seq_lens: torch.Tensor, seq_lens_cpu: torch.Tensor, last_loc: torch.Tensor
    ) -> torch.Tensor | None:
        if not self._upstream_kernels_fit(
            seq_lens.shape[0]
        ):  # one new page per request
            num_new_pages = get_num_new_pages(
                seq_lens=seq_lens_cpu, page_size=self.page_size, decode=True
            )
            if not self._segments.ensure_free(num_new_pages):
                return None
            self._sync()
        out = super().alloc_decode(seq_lens, seq_lens_cpu, last_loc)
        return self._adopt_upstream_take(out)

    def _release_page_ids(self, *page_ids: torch.Tensor) -> None:
        ids = torch.cat(page_ids) if len(page_ids) > 1 else page_ids[0]
        if ids.numel():
            self._segments.free(ids.to(torch.int64))
            self._sync()


SegmentedAllocator = (
    SegmentedTokenToKVPoolAllocator | SegmentedPagedTokenToKVPoolAllocator
)


def segmented_allocator_for(
    size: int,
    page_size: int,
    dtype: torch.dtype,
    device: str,
    kvcache: KVCache,
    need_sort: bool,
) -> SegmentedAllocator:
    """The segmented counterpart of the token (page 1) or paged allocator upstream builds."""
    if page_size == 1:
        return SegmentedTokenToKVPoolAllocator(size, dtype, device, kvcache, need_sort)
    return SegmentedPagedTokenToKVPoolAllocator(
        size, page_size, dtype, device, kvcache, need_sort
    )
