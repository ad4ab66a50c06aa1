"""Segmented mode in the scheduler loop: commit ahead, give back, and account what is
withheld.

Every iteration starts (on every rank together) with `Scheduler.get_next_batch_to_run`.
Before it, the segmented allocator commits enough free pages for what this iteration can
allocate, so the admission that follows sees a failed commit as a smaller pool (requests
queue, as upstream does when its pool is full) instead of an allocation failing
mid-batch. When fully idle, the idle policy evicts cached KV in trailing segments and
releases them.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any, cast

from sglang.srt.mem_cache.segmented.runtime import RUNTIME

if TYPE_CHECKING:
    import torch

    from sglang.srt.managers.schedule_batch import Req, ScheduleBatch
    from sglang.srt.managers.schedule_policy import AddReqResult, PrefillAdder
    from sglang.srt.managers.scheduler import Scheduler
    from sglang.srt.managers.scheduler_components.invariant_checker import (
        SchedulerInvariantChecker,
    )
    from sglang.srt.managers.scheduler_components.pool_stats_observer import PoolStats
    from sglang.srt.mem_cache.segmented.swa_allocator import (
        SegmentedSWATokenToKVPoolAllocator,
    )

logger = logging.getLogger(__name__)


def iteration_demand_tokens(scheduler: Scheduler, decode_slots: int = 1) -> int:
    """An upper bound of the KV slots one iteration allocates, and of what upstream's
    admission takes as reserved from then on: the chunked request's whole remaining
    input, the waiting queue's requests up to one chunk with the request that crosses
    the chunk boundary counted whole (upstream admits it as a chunked request and, to
    make progress, continues it later whatever the pool holds then), one page of
    rounding per request, plus one decode step of the running requests (``decode_slots``
    each: see `decode_slots`)."""
    page = int(scheduler.page_size)
    decode = decode_step_tokens(scheduler, decode_slots)
    chunked = scheduler.chunked_req
    continuation = 0
    if chunked is not None:
        done = int(getattr(chunked, "prefix_len", 0) or 0)
        continuation = max(0, len(chunked.origin_input_ids) - done) + page
    queue = sum(extend_estimate(req) + page for req in admission_candidates(scheduler))
    return continuation + queue + decode


def decode_step_tokens(scheduler: Scheduler, decode_slots: int = 1) -> int:
    """An upper bound of the KV slots the running requests' next decode step allocates
    (``decode_slots`` each, page-rounded, plus one page of rounding per request)."""
    page = int(scheduler.page_size)
    running = getattr(scheduler, "running_batch", None)
    n_running = len(running.reqs) if running is not None else 0
    # The last prefill batch joins the running batch inside get_next_batch_to_run, before
    # its decode step allocates.
    last = getattr(scheduler, "last_batch", None)
    mode = getattr(last, "forward_mode", None)
    if (
        last is not None
        and last is not running
        and mode is not None
        and mode.is_extend()
    ):
        n_running += len(last.reqs)
    return n_running * (-(-decode_slots // page) + 1) * page if n_running else 0


def extend_estimate(req: Req) -> int:
    """The tokens admission extends a waiting request by: upstream admits by them, after
    the prefix match (the last one known; 0 before a request's first)."""
    return (
        len(req.origin_input_ids)
        + len(req.output_ids)
        - int(getattr(req, "prefix_len", 0) or 0)
    )


def admission_candidates(scheduler: Scheduler) -> list[Req]:
    """The waiting requests one iteration can admit: up to one chunk of extended tokens,
    the request that crosses the chunk boundary included (upstream admits it as a
    chunked request)."""
    chunk = getattr(scheduler, "chunked_prefill_size", None)
    cap = None if chunk is None or chunk <= 0 else int(chunk)
    page = int(getattr(scheduler, "page_size", 1) or 1)
    out: list[Req] = []
    tokens = 0
    for req in scheduler.waiting_queue:
        out.append(req)
        tokens += extend_estimate(req) + page
        if cap is not None and tokens >= cap:
            break
    return out


def _has_work(scheduler: Scheduler) -> bool:
    running = getattr(scheduler, "running_batch", None)
    return bool(
        scheduler.waiting_queue
        or scheduler.chunked_req is not None
        or (running is not None and not running.is_empty())
    )


def before_get_next_batch_to_run(
    scheduler: Scheduler, *args: Any, **kwargs: Any
) -> None:
    """Called first in `Scheduler.get_next_batch_to_run`: commit ahead (and shrink) in
    segmented mode; where req_to_token rows are committed explicitly (a GPU), whatever
    the KV allocator: release what freed rows held and ready the rows admission may
    take."""
    decision = RUNTIME.decision
    if not decision.kv_on_demand and not decision.explicit_commits:
        return None
    if RUNTIME.state.restore_pending and _has_work(scheduler):  # set by a resume only
        from sglang.srt.mem_cache.segmented import memory_release

        memory_release.restore_before_first_batch(scheduler)
    slots, row_ahead = decode_slots()
    allocator = RUNTIME.segmented_allocator(scheduler.token_to_kv_pool_allocator)
    if allocator is not None:
        if _has_work(scheduler):
            allocator.note_busy()
        allocator.scheduler_step(iteration_demand_tokens(scheduler, slots))
        if (
            RUNTIME.budget is not None
        ):  # --kv-budget: a PR of its own in the upstream series
            from sglang.srt.mem_cache.segmented import kv_budget

            kv_budget.give_way(scheduler)
    if decision.explicit_commits:
        _prepare_rows(scheduler, row_ahead)
    return None


def _streams(scheduler: Scheduler) -> tuple[torch.cuda.Stream, ...]:
    """The streams the scheduler queues device work on (a fence covers each)."""
    names = ("forward_stream", "schedule_stream", "copy_stream")
    return tuple(
        s for s in (getattr(scheduler, n, None) for n in names) if s is not None
    )


def _prepare_rows(scheduler: Scheduler, row_ahead: int) -> None:
    """Rows freed earlier whose readers finished go back (no device wait); handles are
    made ready for the rows the continuing chunk and the queued requests would take, and
    admission takes no row the ready ones cannot back (`around_add_one_req`)."""
    pool = scheduler.req_to_token_pool
    pool.sync_point(_streams(scheduler))
    chunked = scheduler.chunked_req
    held = []
    if chunked is not None and chunked.kv.req_pool_idx is not None:
        held.append((chunked.kv.req_pool_idx, _row_length(chunked) + row_ahead))
    # Not the whole queue: its spares would be held while it waits.
    pool.prepare_admission(
        held, [_row_length(req) + row_ahead for req in admission_candidates(scheduler)]
    )


def _row_length(req: Req) -> int:
    """Positions of a request's req_to_token row its next extend writes (prefix included)."""
    return len(req.origin_input_ids) + len(req.output_ids)


# On upstream's PrefillAdder (one per scheduling round): the request `admit_row` last said
# yes to, until the next request shows whether upstream added it.
_ROW_ADMITTED = "_kvalloc_row_admitted"


def row_admission(
    adder: PrefillAdder, req: Req, *args: Any, **kwargs: Any
) -> AddReqResult | None:
    """Called first in `PrefillAdder.add_one_req`; where it answers, that is upstream's
    answer: where req_to_token rows are committed explicitly (a GPU), a
    request that needs a new row is admitted only if the granules it would commit are
    ready (`SegmentedReqToTokenPool.admit_row`); otherwise it waits
    (`AddReqResult.OTHER`), as upstream stops adding for other reasons (upstream raises
    when a row cannot be allocated). A request admitted here that upstream then did not
    add gives its promise back when the round's next request comes (none comes after the
    round's last: the next round's `prepare_admission` starts afresh)."""
    if not RUNTIME.decision.explicit_commits:
        return None
    pool = RUNTIME.state.req_to_token_pool
    admitted = adder.__dict__.pop(_ROW_ADMITTED, None)
    if admitted is not None and not (
        adder.can_run_list and adder.can_run_list[-1] is admitted
    ):
        pool.unadmit_row()
    if req.kv.holds_kv:
        return None
    _, row_ahead = decode_slots()
    if not pool.admit_row(_row_length(req) + row_ahead):
        from sglang.srt.managers.schedule_policy import AddReqResult

        return AddReqResult.OTHER
    setattr(adder, _ROW_ADMITTED, req)
    return None


def decode_rows_committed(
    ok: bool,
    batch: ScheduleBatch,
    selected_indices: list[int] | None = None,
    *args: Any,
    **kwargs: Any,
) -> bool:
    """Called where `ScheduleBatch.check_decode_mem` returns, with its result: besides
    upstream's KV check, every request's req_to_token row covers the positions the next
    decode steps write (two, for the overlap scheduler), committed here where it does
    not. A row that cannot grow fails the check, so upstream retracts requests (and
    aborts the last one) as it does when its KV pool is full, instead of a write landing
    on the scratch page every uncommitted row reads."""
    pool = batch.req_to_token_pool
    if not ok or not RUNTIME.decision.explicit_commits:
        return ok
    reqs = (
        batch.reqs
        if selected_indices is None
        else [batch.reqs[i] for i in selected_indices]
    )
    _, row_ahead = decode_slots()
    rows = [
        (
            req.kv.req_pool_idx,
            len(req.origin_input_ids) + len(req.output_ids) + row_ahead,
        )
        for req in reqs
        if req.kv.req_pool_idx is not None
    ]
    return pool.check_decode_rows(rows)


def before_run_batch(
    scheduler: Scheduler, batch: ScheduleBatch, *args: Any, **kwargs: Any
) -> None:
    """Called first in `Scheduler.run_batch`: where req_to_token rows are committed
    explicitly (a GPU), tell the rows how far this batch's kernels read them before it
    is queued. fa3's metadata gathers every row of the batch to the longest
    (`req_to_token[rows, :max_seq_len_k]`, in extend, eager decode and the prefill-graph
    replay), padded graph rows read row 0, and a top-k > 1 verify reads whole rows; with
    the overlap scheduler the next iteration's commits happen while these reads are in
    flight, so the granules they cover stay mapped until then."""
    pool = scheduler.req_to_token_pool
    if batch is None or not RUNTIME.decision.explicit_commits or not batch.reqs:
        return None
    rows = [
        req.kv.req_pool_idx for req in batch.reqs if req.kv.req_pool_idx is not None
    ]
    _, row_ahead = decode_slots()
    longest = max(len(req.origin_input_ids) + len(req.output_ids) for req in batch.reqs)
    reach = longest + row_ahead
    if _reads_whole_rows():
        reach = pool.max_context_len
    pool.note_reads([(row, reach) for row in (0, *rows)])
    return None


def _reads_whole_rows() -> bool:
    """Speculative verify with top-k > 1: fa3 gathers ``req_to_token[rows, :]``."""
    from sglang.srt.runtime_context import get_spec

    spec = get_spec()
    topk = getattr(spec, "speculative_eagle_topk", None) or 1
    return spec.speculative_algorithm is not None and topk > 1


def decode_slots() -> tuple[int, int]:
    """(KV slots one decode step may allocate per request, positions past a request's
    length its req_to_token row must cover): 1 and 2 (two steps ahead under the overlap
    scheduler) without speculative decoding; with it, upstream's own per-decode reserve
    (`get_alloc_reserve_per_decode`: twice max(top-k x steps, draft tokens),
    page-aligned branches for spec v2 trees, the overlap scheduler's lag included), and
    for the row that reserve rounded up to a page past the committed length, as upstream
    writes it (`page_aligned_decode_alloc_lens`)."""
    from sglang.srt.runtime_context import get_spec

    if get_spec().speculative_algorithm is None:
        return 1, 2
    from sglang.srt.mem_cache.allocation_sizing import (
        get_alloc_page_size,
        get_alloc_reserve_per_decode,
    )

    reserve = int(get_alloc_reserve_per_decode())
    return reserve, reserve + int(get_alloc_page_size()) - 1


def before_on_idle(scheduler: Scheduler, *args: Any, **kwargs: Any) -> None:
    """Called first in `Scheduler.on_idle`: the idle policy (evict trailing cache,
    release segments), ahead of upstream's leak check and fully-idle load publish (so
    both see what was given back) and of its wait for the next request (after which a
    request may be arriving). Freed req_to_token rows need nothing here: the idle loop
    still passes the sync point at the top of each iteration, where their fences have
    passed."""
    if not scheduler.is_fully_idle():
        return None
    if RUNTIME.budget is not None:
        RUNTIME.budget.stop_wanting()  # idle: nothing here waits on the budget any more
    allocator = RUNTIME.segmented_allocator(scheduler.token_to_kv_pool_allocator)
    if allocator is not None and allocator.idle_step(scheduler.tree_cache):
        RUNTIME.graph.release_at_idle()
    return None


def after_flush_cache(
    flushed: bool, scheduler: Scheduler, *args: Any, **kwargs: Any
) -> None:
    """Called last in `Scheduler.flush_cache`: a flushed cache holds nothing, so in
    segmented mode every KV segment but each pool's first goes back now (graph-buffer
    granules and spare handles too), not after the idle hold-off (never, with an `inf`
    hold-off). Every rank flushes together; the release is agreed as the idle policy's
    is."""
    allocator = RUNTIME.segmented_allocator(scheduler.token_to_kv_pool_allocator)
    if not flushed or allocator is None:
        return None
    released = allocator.maybe_shrink_now()
    RUNTIME.graph.release_at_idle()
    RUNTIME.backings.trim_spares()
    stats = allocator.segment_stats()
    logger.info(
        "Cache flushed: released %d KV segments; %d committed, %.2f MB.",
        released,
        stats["committed_segments"],
        stats["committed_bytes"] / 1e6,
    )
    return None


def withheld_counted_in_full_pool(
    checker: SchedulerInvariantChecker, ps: PoolStats, *args: Any, **kwargs: Any
) -> PoolStats:
    """Called first in `SchedulerInvariantChecker._check_full_pool`, for its `ps`:
    tokens withheld after a failed commit are neither free nor used; the leak identity
    counts them as available, so it still catches real leaks while the pool is smaller."""
    allocator = RUNTIME.segmented_allocator(checker.token_to_kv_pool_allocator)
    extra = allocator.withheld_size() if allocator is not None else 0
    if extra:
        ps = dataclasses.replace(ps, full_available_size=ps.full_available_size + extra)
    return ps


def withheld_counted_in_swa_pool(
    checker: SchedulerInvariantChecker, ps: PoolStats, *args: Any, **kwargs: Any
) -> PoolStats:
    """Called first in `SchedulerInvariantChecker._check_swa_pool`, for its `ps`: the
    same for the sliding-window sub-pool of a segmented hybrid SWA allocator."""
    allocator = RUNTIME.segmented_allocator(checker.token_to_kv_pool_allocator)
    # Upstream checks the sliding-window side of hybrid SWA allocators only.
    swa = cast("SegmentedSWATokenToKVPoolAllocator | None", allocator)
    extra = swa.swa_withheld_size() if swa is not None else 0
    if extra:
        ps = dataclasses.replace(ps, swa_available_size=ps.swa_available_size + extra)
    return ps
