"""Segmented mode on upstream's pools: subclasses of upstream's MHA and MLA KV pools and of
its token, paged and hybrid SWA allocators, whose memory is reserved up front and committed
segment by segment (`req_to_token` is `row_pool.SegmentedReqToTokenPool`).

Slot ids never move: buffers are one contiguous tensor each over a reservation, so the radix
cache, req_to_token and every attention kernel work unchanged. The reservation is made by the
device's backing factory (`open_backings`): an anonymous mmap on the CPU, the CUDA driver's
virtual memory API on a GPU.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.swa import SWATokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool
from sglang.srt.utils import get_num_new_pages

from sglang_kvalloc.core.backing import BackingFactory, CpuBackingFactory
from sglang_kvalloc.core.segments import (
    SegmentedBuffers,
    SegmentedPageAllocator,
    SegmentGeometry,
    aligned_segment_tokens,
    default_segment_tokens,
)

logger = logging.getLogger(__name__)

DEFAULT_HOLD_OFF_S = 5.0
DEFAULT_IDLE_CACHE_TOKENS = 8192
# Growth/shrink log lines: at most one per this many seconds (the gauges carry every change).
LOG_INTERVAL_S = 10.0
# Shrink checks (and, with several ranks, their agreement) every this many scheduler
# iterations: counted, not timed, so every rank checks in the same iteration.
SYNC_EVERY_ITERATIONS = 8
# While busy the shrink check (a census of the free list, 40-60 us on the CPU) runs every this
# many iterations: a fraction of a second at serving step times, against a 5 s hold-off.
SHRINK_CHECK_EVERY_ITERATIONS = 32


def _agree_alone(value: int) -> int:
    return value


class SegmentSettings:
    """What segmented mode was asked for; set per process by the configurator hook."""

    segment_tokens: int | None = None
    hold_off_s: float = DEFAULT_HOLD_OFF_S
    idle_cache_tokens: int = DEFAULT_IDLE_CACHE_TOKENS
    device: str = "cpu"
    # Makes the reservations on the device in use (CPU mmap, or the CUDA VMM backing).
    backings: BackingFactory = CpuBackingFactory()
    # MIN of an int over the ranks that share this KV pool's decisions (attention TP).
    agree: Callable[[int], int] = staticmethod(_agree_alone)


SETTINGS = SegmentSettings()


# CI only: "module:callable" returning a `VmmApi` (the fake driver), so the CPU engine serves
# over the CUDA VMM backing and every GPU code path of the plugin (test/e2e).
TEST_VMM_API_ENV = "SGLANG_KVALLOC_TEST_VMM_API"


def open_backings(device: str) -> BackingFactory:
    """Make (once) and install the backing factory of ``device``: the CPU mmap one, or the
    CUDA VMM one, which checks the device, the driver and the environment first. A device
    that cannot back segmented mode is a one-line KvAllocModeError."""
    from sglang_kvalloc import modes
    from sglang_kvalloc.core.backing import BackingUnavailableError

    if os.environ.get(TEST_VMM_API_ENV) and device.startswith("cpu"):
        return _test_vmm_backings(os.environ[TEST_VMM_API_ENV])
    if device.startswith("cpu"):
        if not isinstance(SETTINGS.backings, CpuBackingFactory):
            SETTINGS.backings = CpuBackingFactory()
        return SETTINGS.backings
    if not device.startswith("cuda"):
        raise modes.KvAllocModeError(
            f"--kv-alloc-mode segmented has no backing for device {device!r} (cpu and cuda "
            "have one); use --kv-alloc-mode static"
        )
    from sglang.srt.environ import envs

    if envs.SGLANG_ENABLE_POST_CAPTURE_KV_SIZING.get():
        raise modes.KvAllocModeError(
            "--kv-alloc-mode segmented sizes the KV pool itself: unset "
            "SGLANG_ENABLE_POST_CAPTURE_KV_SIZING, or use --kv-alloc-mode static"
        )
    from sglang_kvalloc.core.cuda_backing import CudaBackingFactory, VmmDevice
    from sglang_kvalloc.upstream.cuda_vmm import UpstreamVmmApi

    if isinstance(SETTINGS.backings, CudaBackingFactory):
        return SETTINGS.backings
    device_id = torch.cuda.current_device()
    try:
        api = UpstreamVmmApi(device_id)
        SETTINGS.backings = CudaBackingFactory(VmmDevice.get(api, device_id))
    except BackingUnavailableError as exc:
        raise modes.KvAllocModeError(
            f"--kv-alloc-mode segmented cannot run on {device}: {exc}; use --kv-alloc-mode static"
        ) from None
    logger.info(
        "Segmented mode on %s: CUDA virtual memory, granularity %d MiB, uncommitted ranges "
        "mapped to a zero-filled scratch granule.",
        device,
        SETTINGS.backings.granularity >> 20,
    )
    return SETTINGS.backings


def _test_vmm_backings(spec: str) -> BackingFactory:
    """The CUDA VMM backing over the `VmmApi` that ``spec`` ("module:callable") makes: the
    CPU engine then runs the plugin's GPU paths (explicit commits, fixed RoPE, fences)."""
    import importlib

    from sglang_kvalloc.core.cuda_backing import CudaBackingFactory, VmmDevice

    if isinstance(SETTINGS.backings, CudaBackingFactory):
        return SETTINGS.backings
    module, _, name = spec.partition(":")
    api = getattr(importlib.import_module(module), name)()
    SETTINGS.backings = CudaBackingFactory(VmmDevice.get(api, 0))
    logger.warning("%s=%s: the CUDA VMM backing runs over a test driver.", TEST_VMM_API_ENV, spec)
    return SETTINGS.backings


def _choose_segment_tokens(
    requested: int | None, cap_tokens: int, page_size: int, row_bytes: list[int], gran: int
) -> int:
    """The segment size: the request (made a page multiple, at most the pool) or the default;
    then rounded up so every buffer's segment spans whole granules of the backing."""
    if requested is not None:
        size = -(-requested // page_size) * page_size
        if size > cap_tokens:
            # The launcher refuses what it can tell is too large; the exact pool is only
            # known here, after the weights loaded.
            logger.warning(
                "--kv-segment-tokens %d is larger than the KV pool (%d tokens): one segment "
                "holds the whole pool.",
                requested,
                cap_tokens - page_size,
            )
            size = cap_tokens
        elif size != requested:
            logger.warning(
                "--kv-segment-tokens %d rounded up to %d, a multiple of --page-size %d.",
                requested,
                size,
                page_size,
            )
    else:
        size = default_segment_tokens(cap_tokens, page_size)
    aligned = aligned_segment_tokens(size, page_size, row_bytes, gran)
    return min(aligned, math.ceil(cap_tokens / page_size) * page_size)


class _RateLimitedLog:
    def __init__(self) -> None:
        self._last = 0.0
        self.suppressed = 0

    def __call__(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last >= LOG_INTERVAL_S:
            if self.suppressed:
                msg += f" ({self.suppressed} earlier changes not logged)"
            logger.info(msg, *args)
            self._last = now
            self.suppressed = 0
        else:
            self.suppressed += 1


def _segment_pool_buffers(
    pool: Any, row_bytes: list[int], cap_tokens: int, kind: str
) -> SegmentedBuffers:
    """Reserve one segment-committed buffer per entry of ``row_bytes`` (bytes per token slot)
    for a pool of ``cap_tokens`` slots (slot 0's page included), and log what was reserved."""
    gran = SETTINGS.backings.granularity
    seg_tokens = _choose_segment_tokens(
        SETTINGS.segment_tokens, cap_tokens, pool.page_size, row_bytes, gran
    )
    geometry = SegmentGeometry(cap_tokens, seg_tokens, pool.page_size)
    buffers = SegmentedBuffers.create(geometry, row_bytes, backings=SETTINGS.backings)
    logger.info(
        "Segmented %s KV pool: %d tokens reserved (%.3f GB address space) in %d segments of %d "
        "tokens (%.2f MB each); committed now: %.2f MB.",
        kind,
        cap_tokens - pool.page_size,
        sum(b.reserved_bytes for b in buffers.backings) / 1e9,
        geometry.num_segments,
        seg_tokens,
        seg_tokens * sum(row_bytes) / 1e6,
        buffers.committed_bytes / 1e6,
    )
    return buffers


class SegmentedMHATokenToKVPool(MHATokenToKVPool):
    """MHA KV pool whose per-layer K and V buffers sit on reserved, segment-committed memory.
    Also each sub-pool (full and sliding-window) of upstream's hybrid `SWAKVPool`."""

    segmented_buffers: SegmentedBuffers

    def _create_buffers_normal(self) -> None:
        layout = getattr(self, "kv_cache_layout", "nhd")
        if layout != "nhd" or getattr(self, "use_hnd", False):
            raise ValueError(
                f"--kv-alloc-mode segmented supports the NHD KV layout only (got {layout!r})"
            )
        k_shape, v_shape = self._kv_buffer_shapes()
        itemsize = self.store_dtype.itemsize
        k_row = int(math.prod(k_shape[1:])) * itemsize
        v_row = int(math.prod(v_shape[1:])) * itemsize
        row_bytes = [k_row] * self.layer_num + [v_row] * self.layer_num
        label = getattr(self, "allocation_label", None)
        kind = f"MHA ({label})" if label and label != "KV" else "MHA"
        # size + page_size rows: slot 0's page is padding
        self.segmented_buffers = _segment_pool_buffers(self, row_bytes, k_shape[0], kind)
        backings = self.segmented_buffers.backings
        self.k_buffer = [
            backings[i].tensor(self.store_dtype, tuple(k_shape)) for i in range(self.layer_num)
        ]
        self.v_buffer = [
            backings[self.layer_num + i].tensor(self.store_dtype, tuple(v_shape))
            for i in range(self.layer_num)
        ]


class SegmentedMLATokenToKVPool(MLATokenToKVPool):
    """MLA (DeepSeek) KV pool: each layer's latent buffer (kv_lora_rank + qk_rope_head_dim per
    token) on reserved, segment-committed memory."""

    segmented_buffers: SegmentedBuffers

    def _create_buffers(self) -> None:
        if getattr(self, "custom_mem_pool", None) is not None:
            raise ValueError(
                "--kv-alloc-mode segmented cannot place the MLA pool in a custom memory pool"
            )
        shape = (self.size + self.page_size, 1, self.kv_cache_dim)
        row_bytes = [self.kv_cache_dim * self.store_dtype.itemsize] * self.layer_num
        self.segmented_buffers = _segment_pool_buffers(self, row_bytes, shape[0], "MLA")
        self.kv_buffer = [
            backing.tensor(self.store_dtype, shape) for backing in self.segmented_buffers.backings
        ]


def _debug_memory_pool() -> bool:
    """Upstream's allocator debug switch (read once per allocator, as upstream does)."""
    from sglang.srt.utils import get_bool_env_var

    return get_bool_env_var("SGLANG_DEBUG_MEMORY_POOL")


class _SegmentedAllocatorMixin:
    """Upstream's allocator API over a `SegmentedPageAllocator` (the upstream-free core).

    Upstream's own `free_pages` tensor is kept equal to the core's sorted free list of
    committed pages, so upstream's extend/decode kernels read it as before. Growth happens
    ahead of need at the top of each scheduler iteration (`scheduler_step`), so allocation
    rarely commits; shrinking happens there and at idle, never inside a free.
    """

    page_size: int
    free_pages: torch.Tensor
    _segments: SegmentedPageAllocator

    def _make_segments(self, kvcache: Any, device: str) -> None:
        buffers: SegmentedBuffers = kvcache.segmented_buffers
        self._committing_ahead = True  # the constructor's first commit is not mid-batch
        self._last_demand_tokens = 0
        self.mid_batch_commits = 0
        log = _RateLimitedLog()
        self._segment_log = log

        def on_commit(seg: int) -> None:
            if not self._committing_ahead:
                # Inside an allocation: the scheduler's commit-ahead did not cover it. Should
                # this commit fail, upstream's allocation fails mid-batch; counted and said.
                self.mid_batch_commits += 1
                log(
                    "KV segment %d committed inside an allocation, not ahead of the iteration "
                    "(its demand estimate was %d tokens); %d such commits so far.",
                    seg,
                    self._last_demand_tokens,
                    self.mid_batch_commits,
                )
            buffers.commit_segment(seg)
            log(
                "KV segments grew: segment %d committed; %d/%d committed, %.2f MB.",
                seg,
                buffers.committed_segments,
                buffers.geometry.num_segments,
                buffers.committed_bytes / 1e6,
            )

        def on_release(seg: int) -> None:
            buffers.release_segment(seg)
            log(
                "KV segments shrank: segment %d released; %d/%d committed, %.2f MB.",
                seg,
                buffers.committed_segments,
                buffers.geometry.num_segments,
                buffers.committed_bytes / 1e6,
            )

        self._buffers = buffers
        self._segments = SegmentedPageAllocator(
            buffers.geometry,
            first_page=1,
            hold_off_s=SETTINGS.hold_off_s,
            on_commit=on_commit,
            on_release=on_release,
            agree=SETTINGS.agree,
            # Like upstream's need_sort: frees are staged in O(1) and merged when an
            # allocation runs short or at a shrink check, not on every free.
            lazy_merge=True,
            debug=_debug_memory_pool(),
            # Upstream's kernels read free_pages where the pool lives (the GPU there).
            device=device,
        )
        self._committing_ahead = False
        self._iteration = 0
        self._commit_failures_logged = 0
        self._withheld_logged = False
        self._failure_logged_at = 0.0
        self._busy_at = time.monotonic()
        self._idle_policy_done = False

    def _sync(self) -> None:
        self.free_pages = self._segments.free_pages

    def available_size(self) -> int:
        # Uncommitted segments count: the scheduler may plan up to the cap (below the ceiling
        # a failed commit sets), and commits follow.
        return self._segments.available_pages() * self.page_size

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
        """Upstream's idle diagnostic: the core's page accounting, under upstream's allocator
        debug switch only (it is O(capacity) and the idle loop calls it often)."""
        if not self._segments.debug:
            return []
        return self._segments.accounting_problems()

    def scheduler_step(self, demand_tokens: int) -> None:
        """Top of every scheduler iteration (every rank together): commit ahead so the
        iteration's allocations find backed pages, and every few iterations give back
        trailing segments empty for the hold-off (keeping that headroom)."""
        # Runs every scheduler iteration: the common path is two integer tests.
        self._iteration += 1
        pages = -(-demand_tokens // self.page_size)
        self._last_demand_tokens = demand_tokens
        seg = self._segments
        prepared = not seg.backed_for(pages)
        if prepared:
            self._committing_ahead = True
            try:
                seg.prepare(pages)
            finally:
                self._committing_ahead = False
        released = 0
        checked = self._iteration % SHRINK_CHECK_EVERY_ITERATIONS == 0
        if checked:
            # Not fresh: on a GPU the census would wait for the running batch.
            released = seg.maybe_shrink(keep_free_pages=pages, fresh=False)
        if prepared or checked:  # the free list may have grown, shrunk or been merged
            self._sync()
        if prepared or released:
            self._log_commit_failure()

    def note_busy(self) -> None:
        """The scheduler has work: the idle policy waits for a full hold-off after it."""
        self._busy_at = time.monotonic()
        self._idle_policy_done = False

    def idle_step(self, tree_cache: Any) -> bool:
        """On a fully idle iteration (every rank): once idle for the hold-off, evict cached KV
        in trailing segments, then LRU down to the retained budget, and give the emptied
        segments back at once. Runs once per idle period; True when it ran."""
        seg = self._segments
        if self._iteration % SYNC_EVERY_ITERATIONS:
            return False
        due = not self._idle_policy_done and time.monotonic() - self._busy_at >= seg.hold_off_s
        if not seg.agree(int(due)):
            return False
        self._idle_policy_done = True
        from sglang_kvalloc.upstream.idle_eviction import evict_at_or_above, evict_lru_down_to

        retain = SETTINGS.idle_cache_tokens
        keep = seg.segments_holding(-(-retain // self.page_size))
        boundary_slot = seg.first_page_of(keep) * self.page_size
        before = self._buffers.committed_bytes
        by_location = evict_at_or_above(tree_cache, boundary_slot)
        by_lru = evict_lru_down_to(tree_cache, retain)
        released = seg.maybe_shrink(hold_off_s=0.0)
        SETTINGS.backings.trim_spares()  # pre-created handles hold memory too
        self._sync()
        if by_location or by_lru or released:
            logger.info(
                "Idle for %.1f s: evicted %d cached tokens at or above slot %d and %d more "
                "(LRU, %d retained); released %d segments: %.2f -> %.2f MB committed.",
                seg.hold_off_s,
                by_location,
                boundary_slot,
                by_lru,
                retain,
                released,
                before / 1e6,
                self._buffers.committed_bytes / 1e6,
            )
        return True

    def _log_commit_failure(self) -> None:
        """WARNING when commits start failing (then at most every LOG_INTERVAL_S while they
        keep failing), INFO when the capacity is back."""
        seg = self._segments
        withheld = seg.ceiling < seg.geometry.num_segments
        if not withheld:
            if self._withheld_logged:
                logger.info(
                    "KV segment commits succeed again: all %d tokens available.",
                    seg.capacity_pages * self.page_size,
                )
                self._withheld_logged = False
            return
        if seg.commit_failures == self._commit_failures_logged:
            return
        now = time.monotonic()
        if self._withheld_logged and now - self._failure_logged_at < LOG_INTERVAL_S:
            return
        logger.warning(
            "KV segment commit failed (%s; %d failures so far): %d of %d tokens withheld until "
            "a commit succeeds (retried every %.1f s); requests queue as for a full pool.",
            seg.last_commit_error,
            seg.commit_failures,
            seg.withheld_pages() * self.page_size,
            seg.capacity_pages * self.page_size,
            seg.retry_s,
        )
        self._commit_failures_logged = seg.commit_failures
        self._withheld_logged = True
        self._failure_logged_at = now

    def maybe_shrink_now(self) -> int:
        """Release every trailing empty segment at once (the idle policy's release)."""
        released = self._segments.maybe_shrink(hold_off_s=0.0)
        self._sync()
        return released

    def maybe_shrink(self, keep_free_tokens: int = 0) -> int:
        """Release trailing segments empty for the hold-off (every rank the same count)."""
        released = self._segments.maybe_shrink(keep_free_pages=keep_free_tokens // self.page_size)
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
            "hold_off_s": seg.hold_off_s,
        }


class SegmentedTokenToKVPoolAllocator(_SegmentedAllocatorMixin, TokenToKVPoolAllocator):
    """page_size 1: slot ids are page ids."""

    def __init__(self, size: int, dtype: torch.dtype, device: str, kvcache: Any, need_sort: bool):
        self._make_segments(kvcache, device)
        super().__init__(size, dtype, device, kvcache, need_sort)

    def clear(self) -> None:
        self._segments.clear()
        self._sync()
        self.free_group = None
        self.release_pages = torch.empty((0,), dtype=torch.int64, device=self.device)

    def alloc(self, need_size: int) -> torch.Tensor | None:
        out = self._segments.alloc(need_size)
        self._sync()
        return out

    def free(self, free_index: torch.Tensor) -> None:
        if free_index.numel() == 0:
            return
        if self.free_group is not None:
            self.free_group.append(self._copy_for_free_group(free_index))
            return
        self._segments.free(free_index.to(torch.int64))
        self._sync()


class SegmentedPagedTokenToKVPoolAllocator(_SegmentedAllocatorMixin, PagedTokenToKVPoolAllocator):
    """page_size > 1: upstream's extend/decode kernels over the core's committed free list."""

    def __init__(
        self,
        size: int,
        page_size: int,
        dtype: torch.dtype,
        device: str,
        kvcache: Any,
        need_sort: bool,
    ):
        self._make_segments(kvcache, device)
        super().__init__(size, page_size, dtype, device, kvcache, need_sort)

    def clear(self) -> None:
        super().clear()
        self._segments.clear()
        self._sync()

    def alloc(self, need_size: int) -> torch.Tensor | None:
        if self.debug_mode:
            assert need_size % self.page_size == 0, "The allocation size should be page-aligned"
        pages = self._segments.alloc(need_size // self.page_size)
        self._sync()
        if pages is None:
            return None
        return (
            pages[:, None] * self.page_size + torch.arange(self.page_size, device=self.device)
        ).reshape(-1)

    def _upstream_kernels_fit(self, max_new_pages: int) -> bool:
        """The pages upstream's kernels may take are merged and backed already (nothing
        withheld): they run on the core's free list as it is, without counting the new pages
        first (a CPU sum over the batch that upstream's call does anyway)."""
        seg = self._segments
        free = self.free_pages = seg.free_pages
        return (
            max_new_pages <= free.shape[0]
            and seg.committed_segments <= seg.ceiling
            and not seg.debug
        )

    def _adopt_upstream_take(self, out: torch.Tensor | None) -> torch.Tensor | None:
        """Upstream's kernels took the lowest free pages by slicing `free_pages`: the core
        adopts what they left."""
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
                    seq_lens=seq_lens_cpu, page_size=self.page_size, prefix_lens=prefix_lens_cpu
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
        if not self._upstream_kernels_fit(seq_lens.shape[0]):  # one new page per request
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


def segmented_allocator_for(
    size: int, page_size: int, dtype: torch.dtype, device: str, kvcache: Any, need_sort: bool
) -> SegmentedTokenToKVPoolAllocator | SegmentedPagedTokenToKVPoolAllocator:
    """The segmented counterpart of the token (page 1) or paged allocator upstream builds."""
    if page_size == 1:
        return SegmentedTokenToKVPoolAllocator(size, dtype, device, kvcache, need_sort)
    return SegmentedPagedTokenToKVPoolAllocator(size, page_size, dtype, device, kvcache, need_sort)


class SegmentedSWATokenToKVPoolAllocator(SWATokenToKVPoolAllocator):
    """Upstream's hybrid SWA allocator with both sub-allocators segmented.

    Upstream's own logic is kept whole: the full-to-SWA index translation, the SWA frees of
    out-of-window KV (`free_swa`), free groups. Only the two sub-allocators it drives are
    replaced, each over its own sub-pool's segments, so a slot the SWA radix cache evicts goes
    back to its segment and a trailing SWA segment left empty is given back.
    """

    def __init__(
        self,
        size: int,
        size_swa: int,
        page_size: int,
        dtype: torch.dtype,
        device: str,
        kvcache: Any,
        need_sort: bool,
        req_to_token_pool: Any = None,
    ) -> None:
        super().__init__(
            size, size_swa, page_size, dtype, device, kvcache, need_sort, req_to_token_pool
        )
        self.full_attn_allocator = segmented_allocator_for(
            size, page_size, dtype, device, kvcache.full_kv_pool, need_sort
        )
        self.swa_attn_allocator = segmented_allocator_for(
            size_swa, page_size, dtype, device, kvcache.swa_kv_pool, need_sort
        )
        self.clear()

    @property
    def _parts(self) -> tuple[Any, Any]:
        return self.full_attn_allocator, self.swa_attn_allocator

    def scheduler_step(self, demand_tokens: int) -> None:
        # Every new token takes a slot on both sides (the SWA side frees out-of-window ones).
        for part in self._parts:
            part.scheduler_step(demand_tokens)

    def note_busy(self) -> None:
        for part in self._parts:
            part.note_busy()

    def idle_step(self, tree_cache: Any) -> bool:
        ran = self.full_attn_allocator.idle_step(tree_cache)
        if ran:
            # Whatever the full side's eviction freed on the SWA side goes back too.
            self.swa_attn_allocator.maybe_shrink_now()
        return ran

    def withheld_size(self) -> int:
        return self.full_attn_allocator.withheld_size()

    def swa_withheld_size(self) -> int:
        return self.swa_attn_allocator.withheld_size()

    def maybe_shrink(self, keep_free_tokens: int = 0) -> int:
        return sum(part.maybe_shrink(keep_free_tokens) for part in self._parts)

    def verify_byte_accounting(self) -> list[str]:
        return [
            f"{name}: {problem}"
            for name, part in zip(("full", "swa"), self._parts, strict=True)
            for problem in part.verify_byte_accounting()
        ]

    @property
    def mid_batch_commits(self) -> int:
        return sum(part.mid_batch_commits for part in self._parts)

    def segment_stats(self) -> dict[str, Any]:
        """The two sub-pools summed (bytes, segments, counters), and each one by name."""
        full, swa = (part.segment_stats() for part in self._parts)
        out: dict[str, Any] = {}
        for key, value in full.items():
            # Settings, and the full pool's tokens (what bounds a request), are not summed.
            if key in ("segment_tokens", "hold_off_s", "used_tokens", "withheld_tokens"):
                out[key] = value
            else:
                out[key] = value + swa[key]
        out["pools"] = {"full": full, "swa": swa}
        return out
