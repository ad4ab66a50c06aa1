"""Segmented KV under PD disaggregation (issue 36, stage 2).

Both sides commit their KV pool on demand, as a plain server does. What PD adds:
- the transfer engine registers the committed segments only, each as it is committed,
  and deregisters each before its memory goes (RDMA reads and writes registered, backed
  memory);
- the decode side commits ahead for its pre-allocation queue and admits from it by
  committed free memory only, so a failed commit queues requests instead of failing an
  allocation;
- every transfer's pages are checked to lie in committed memory when the transfer is set
  up (the decode side's pre-allocated destination, the prefill side's source);
- both PD event loops run the scheduler step (commit ahead, shrink checks) that
  `Scheduler.get_next_batch_to_run` runs on a plain server. Idle release needs nothing
  more: upstream's `is_fully_idle` already waits for the bootstrap, pre-allocation,
  transfer and in-flight queues.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from sglang.srt.mem_cache.segmented import scheduler_loop
from sglang.srt.mem_cache.segmented.runtime import RUNTIME

if TYPE_CHECKING:
    from sglang.srt.disaggregation.decode import DecodePreallocQueue, DecodeRequest
    from sglang.srt.disaggregation.mooncake.conn import MooncakeKVManager
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.managers.scheduler import Scheduler
    from sglang.srt.mem_cache.segmented.buffers import SegmentedBuffers
    from sglang.srt.mem_cache.segmented.runtime import SegmentedKvAllocator

logger = logging.getLogger(__name__)


class TransferOutsideCommittedMemory(RuntimeError):
    """A transfer was set up to read or write KV slots whose memory is not committed."""


# -- registrations that follow the committed segments ----------------------------------------


def _base_addresses(buffers: SegmentedBuffers) -> list[int]:
    return [
        backing.tensor(torch.uint8, (1,)).data_ptr() for backing in buffers.backings
    ]


class SegmentRegistrations:
    """One transfer engine's registrations of one segmented KV pool: each committed
    segment's range of every buffer, registered when the segment is committed and
    deregistered before it is released (a `SegmentListener`)."""

    def __init__(self, engine: Any, buffers: SegmentedBuffers) -> None:
        self.engine = engine
        self.buffers = buffers
        self.bases = _base_addresses(buffers)

    def regions(self, seg: int) -> list[tuple[int, int]]:
        """(address, bytes) of segment ``seg`` in each buffer."""
        out = []
        for b, base in enumerate(self.bases):
            offset, nbytes = self.buffers.byte_range(b, seg)
            if nbytes:
                out.append((base + offset, nbytes))
        return out

    def committed_regions(self) -> list[tuple[int, int]]:
        buffers = self.buffers
        segs = range(buffers.geometry.num_segments)
        return [
            r for seg in segs if buffers.is_committed(seg) for r in self.regions(seg)
        ]

    def segment_committed(self, buffers: SegmentedBuffers, seg: int) -> None:
        ptrs, lens = zip(*self.regions(seg), strict=True)
        ret = self.engine.batch_register(list(ptrs), list(lens))
        if ret:
            raise RuntimeError(f"the transfer engine's batch_register returned {ret}")

    def segment_releasing(self, buffers: SegmentedBuffers, seg: int) -> None:
        ptrs = [ptr for ptr, _ in self.regions(seg)]
        ret = self.engine.batch_deregister(ptrs)
        if ret:  # the memory goes anyway; the engine keeps a stale entry
            logger.warning("Deregistering KV segment %d returned %s.", seg, ret)


def _registrations(
    manager: MooncakeKVManager, engine: Any
) -> list[SegmentRegistrations]:
    """One per segmented KV pool whose buffers this manager registers (found by their
    base addresses among the manager's KV pointers)."""
    if not RUNTIME.decision.kv_on_demand:
        return []
    ptrs = set(manager.kv_args.kv_data_ptrs or [])
    made = (SegmentRegistrations(engine, buffers) for buffers in RUNTIME.kv_buffers)
    return [
        registrations
        for registrations in made
        if ptrs.intersection(registrations.bases)
    ]


def registerable_committed_regions(
    regions: list[tuple[int, int]], manager: MooncakeKVManager
) -> list[tuple[int, int]]:
    """Called where `MooncakeKVManager._registerable_regions` returns, with its result:
    a segmented KV buffer's whole reservation is replaced by its committed segments'
    ranges (at registration and at the teardown's deregistration alike)."""
    pools = _registrations(manager, None)
    if not pools:
        return regions
    whole = {base for pool in pools for base in pool.bases}
    kept = [region for region in regions if region[0] not in whole]
    return kept + [region for pool in pools for region in pool.committed_regions()]


def after_register_buffer_to_engine(result: None, manager: MooncakeKVManager) -> None:
    """Called last in `MooncakeKVManager.register_buffer_to_engine`: from now on each
    segment is registered as it is committed and deregistered before it is released."""
    listeners = _registrations(manager, manager.engine)
    for listener in listeners:
        listener.buffers.add_listener(listener)
    allocator = RUNTIME.segmented_allocator(RUNTIME.state.allocator)
    if listeners and allocator is not None:
        # A peer's transfer block must lie in one registered segment (Mooncake refuses one
        # that spans two), and upstream's sender merges every run of consecutive slots.
        allocator.split_runs_at_segments = True
    if listeners:
        manager._kv_alloc_segment_registrations = listeners  # type: ignore
        logger.info(
            "KV transfer registrations follow the committed segments: %d regions now.",
            sum(len(listener.committed_regions()) for listener in listeners),
        )


def before_deregister_buffer_to_engine(manager: MooncakeKVManager) -> None:
    """Called first in `MooncakeKVManager.deregister_buffer_to_engine` (teardown): no
    more registrations follow the segments; the deregistration covers those committed
    now."""
    for listener in getattr(manager, "_kv_alloc_segment_registrations", []):
        listener.buffers.remove_listener(listener)
    manager._kv_alloc_segment_registrations = []  # type: ignore[attr-defined]


# -- the transfers' pages lie in committed memory ----------------------------------------------


def check_committed(
    allocator: SegmentedKvAllocator, slots: torch.Tensor, what: str
) -> None:
    """Raise if any of ``slots`` lies past the committed KV memory (committed segments
    are a prefix of the pool, so one maximum tells)."""
    if slots.numel() == 0:
        return
    top = int(slots.max())
    limit = allocator.committed_slot_limit()
    if top >= limit:
        raise TransferOutsideCommittedMemory(
            f"{what}: KV slot {top} lies past the committed memory (slots below {limit}); "
            "a transfer there would move memory that is not backed"
        )


def before_send_kv_chunk(
    scheduler: Scheduler, req: Req, last_chunk: bool = False, end_idx: int | None = None
) -> None:
    """Called first in `Scheduler.send_kv_chunk` (prefill side): the pages sent lie in
    committed memory. They stay committed until the transfer completes: the request
    holds them until upstream's in-flight queue sees it done, and only wholly free
    segments are released."""
    allocator = RUNTIME.segmented_allocator(scheduler.token_to_kv_pool_allocator)
    if allocator is None or req.kv.req_pool_idx is None:
        return
    # upstream's `_send_kv_chunk`: the slots from the last send to this chunk's end
    end = (
        end_idx
        if end_idx is not None
        else min(req.extend_end, len(req.origin_input_ids))
    )
    row = scheduler.req_to_token_pool.req_to_token[
        req.kv.req_pool_idx, req.start_send_idx : end
    ]
    check_committed(allocator, row, f"request {req.rid}'s KV sent to decode")


def after_pop_preallocated(
    result: tuple[list[DecodeRequest], list[DecodeRequest]],
    queue: DecodePreallocQueue,
    *args: Any,
    **kwargs: Any,
) -> None:
    """Called last in `DecodePreallocQueue.pop_preallocated` (decode side): every page
    pre-allocated for a transfer to write into lies in committed memory."""
    allocator = RUNTIME.segmented_allocator(queue.token_to_kv_pool_allocator)
    if allocator is None:
        return
    for decode_req in result[0]:
        req = decode_req.req
        fill = queue._pre_alloc_fill_len(req)
        row = queue.req_to_token_pool.req_to_token[req.kv.req_pool_idx, :fill]
        check_committed(allocator, row, f"request {req.rid}'s pre-allocated KV")


# -- the decode side's commit-ahead and admission ----------------------------------------------


def preallocation_demand_tokens(queue: DecodePreallocQueue) -> int:
    """An upper bound of the committed free slots upstream's admission asks for before
    it pre-allocates every queued and retracted request: each one's own admission
    requirement (`_required_admission_tokens`: its KV plus the decode reserve, or its
    input plus the clipped new tokens), and the decode reserve of every active request."""
    waiting = [r.req for r in queue.queue] + list(queue.retracted_queue)
    per_request = sum(
        queue._required_admission_tokens(
            req,
            queue._required_alloc_tokens(
                fill_len=queue._pre_alloc_fill_len(req), prefix_len=0
            ),
            0,
            0,
        )
        for req in waiting
    )
    if not waiting:
        return 0
    return per_request + queue._active_reserved_tokens(extra_reserved_reqs=len(waiting))


def before_pop_preallocated(
    queue: DecodePreallocQueue, *args: Any, **kwargs: Any
) -> None:
    """Called first in `DecodePreallocQueue.pop_preallocated`: commit ahead for the
    running requests' next decode step and the queue's requests, so pre-allocation finds
    backed pages."""
    decode_step(queue.scheduler)


def before_next_disagg_decode_batch(
    scheduler: Scheduler, *args: Any, **kwargs: Any
) -> None:
    """Called first in `Scheduler.get_next_disagg_decode_batch_to_run`: the decode
    loop's scheduler step (commit ahead, shrink checks), as `get_next_batch_to_run` has
    on a plain server."""
    decode_step(scheduler)


def decode_step(scheduler: Scheduler) -> None:
    allocator = RUNTIME.segmented_allocator(scheduler.token_to_kv_pool_allocator)
    if allocator is None:
        return
    queue = scheduler.disagg_decode_prealloc_queue
    running = scheduler.running_batch
    if queue.queue or scheduler.waiting_queue or (running is not None and running.reqs):
        allocator.note_busy()
    slots, _ = scheduler_loop.decode_slots()
    demand = scheduler_loop.decode_step_tokens(scheduler, slots)
    allocator.scheduler_step(demand + preallocation_demand_tokens(queue))


def committed_token_budgets(
    tokens: int, queue: DecodePreallocQueue, *args: Any, **kwargs: Any
) -> int:
    """Called where `DecodePreallocQueue._allocatable_token_budgets` returns, with its
    result: upstream counts the allocator's available size, which promises the
    uncommitted segments too; pre-allocation admits by committed free memory only (the
    commit-ahead above covers the queue's demand)."""
    allocator = RUNTIME.segmented_allocator(queue.token_to_kv_pool_allocator)
    if allocator is None:
        return tokens
    return tokens - (allocator.available_size() - allocator.committed_available_size())


def before_next_disagg_prefill_batch(
    scheduler: Scheduler, *args: Any, **kwargs: Any
) -> None:
    """Called first in `Scheduler.get_next_disagg_prefill_batch_to_run`: the prefill
    loop's scheduler step, the one `get_next_batch_to_run` has on a plain server."""
    scheduler_loop.before_get_next_batch_to_run(scheduler)
