"""Segmented mode in the scheduler loop: commit ahead, give back, and account what is withheld.

Every iteration starts (on every rank together) with `Scheduler.get_next_batch_to_run`. Before
it, the segmented allocator commits enough free pages for what this iteration can allocate, so
the admission that follows sees a failed commit as a smaller pool (requests queue, as upstream
does when its pool is full) instead of an allocation failing mid-batch. When fully idle, the
idle policy evicts cached KV in trailing segments and releases them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


def iteration_demand_tokens(scheduler: Any, draft_tokens: int = 0) -> int:
    """An upper bound of the KV slots one iteration allocates, and of what upstream's admission
    takes as reserved from then on: the chunked request's whole remaining input, the waiting
    queue's requests up to one chunk with the request that crosses the chunk boundary counted
    whole (upstream admits it as a chunked request and, to make progress, continues it later
    whatever the pool holds then), one page of rounding per request, plus one decode step
    (``draft_tokens`` speculative tokens included) of the running requests."""
    page = int(scheduler.page_size)
    running = getattr(scheduler, "running_batch", None)
    n_running = len(running.reqs) if running is not None else 0
    # The last prefill batch joins the running batch inside get_next_batch_to_run, before
    # its decode step allocates.
    last = getattr(scheduler, "last_batch", None)
    mode = getattr(last, "forward_mode", None)
    if last is not None and last is not running and mode is not None and mode.is_extend():
        n_running += len(last.reqs)
    decode = n_running * (-(-(1 + draft_tokens) // page) + 1) * page if n_running else 0

    chunk = scheduler.chunked_prefill_size
    cap = None if chunk is None or chunk <= 0 else int(chunk)
    chunked = scheduler.chunked_req
    continuation = 0
    if chunked is not None:
        done = int(getattr(chunked, "prefix_len", 0) or 0)
        continuation = max(0, len(chunked.origin_input_ids) - done) + page
    queue = 0
    for req in scheduler.waiting_queue:
        queue += len(req.origin_input_ids) + len(req.output_ids) + page
        if cap is not None and queue >= cap:
            break
    return continuation + queue + decode


def _has_work(scheduler: Any) -> bool:
    running = getattr(scheduler, "running_batch", None)
    return bool(
        scheduler.waiting_queue
        or scheduler.chunked_req is not None
        or (running is not None and not running.is_empty())
    )


def before_get_next_batch_to_run(scheduler: Any, *args: Any, **kwargs: Any) -> None:
    """BEFORE `Scheduler.get_next_batch_to_run`: commit ahead (and shrink) in segmented mode."""
    allocator = getattr(scheduler, "token_to_kv_pool_allocator", None)
    step = getattr(allocator, "scheduler_step", None)
    if step is None:
        return None
    draft = _draft_tokens()
    if _has_work(scheduler):
        allocator.note_busy()
    step(iteration_demand_tokens(scheduler, draft))
    _grow_tables(scheduler, draft)
    return None


def _grow_tables(scheduler: Any, draft: int) -> None:
    """GPU: commit the req_to_token rows and RoPE rows the next step can write or read (a
    GPU does not fault memory in), and release what freed rows left, at this sync point."""
    from sglang_kvalloc.upstream import rope

    pool = scheduler.req_to_token_pool
    rows_known = getattr(pool, "ensure_rows", None) is not None and pool.commits_rows
    if not rows_known and not rope.has_fixed_caches():
        return
    # Two steps ahead: with overlap scheduling the batch formed next may run one step on.
    step = 2 * (1 + draft)
    rows: list[tuple[int, int]] = []
    furthest = 0
    running = getattr(scheduler, "running_batch", None)
    for req in running.reqs if running is not None else ():
        length = len(req.origin_input_ids) + len(req.output_ids) + step
        furthest = max(furthest, length)
        if req.kv.req_pool_idx is not None:
            rows.append((req.kv.req_pool_idx, length))
    chunked = scheduler.chunked_req
    queued = [chunked] if chunked is not None else []
    for req in (*queued, *scheduler.waiting_queue):
        furthest = max(furthest, len(req.origin_input_ids) + len(req.output_ids) + step)
    if rows_known:
        pool.ensure_rows(rows)
        pool.sync_point()
    rope.grow_fixed_caches(furthest)


def _draft_tokens() -> int:
    from sglang.srt.runtime_context import get_spec

    return int(getattr(get_spec(), "speculative_num_draft_tokens", 0) or 0)


def after_on_idle(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER `Scheduler.on_idle`: the idle policy (evict trailing cache, release segments)."""
    allocator = getattr(scheduler, "token_to_kv_pool_allocator", None)
    idle_step = getattr(allocator, "idle_step", None)
    if idle_step is not None and scheduler.is_fully_idle() and idle_step(scheduler.tree_cache):
        from sglang_kvalloc.upstream import graph_buffers

        graph_buffers.release_at_idle()
    return None


def around_check_full_pool(
    original: Callable[..., Any], checker: Any, ps: Any, *args: Any, **kwargs: Any
) -> Any:
    """AROUND `SchedulerInvariantChecker._check_full_pool`: tokens withheld after a failed
    commit are neither free nor used; the leak identity counts them as available, so it still
    catches real leaks while the pool is smaller."""
    withheld = getattr(checker.token_to_kv_pool_allocator, "withheld_size", None)
    extra = withheld() if withheld is not None else 0
    if extra:
        ps = dataclasses.replace(ps, full_available_size=ps.full_available_size + extra)
    return original(checker, ps, *args, **kwargs)


def around_check_swa_pool(
    original: Callable[..., Any], checker: Any, ps: Any, *args: Any, **kwargs: Any
) -> Any:
    """AROUND `SchedulerInvariantChecker._check_swa_pool`: the same for the sliding-window
    sub-pool of a segmented hybrid SWA allocator."""
    withheld = getattr(checker.token_to_kv_pool_allocator, "swa_withheld_size", None)
    extra = withheld() if withheld is not None else 0
    if extra:
        ps = dataclasses.replace(ps, swa_available_size=ps.swa_available_size + extra)
    return original(checker, ps, *args, **kwargs)
