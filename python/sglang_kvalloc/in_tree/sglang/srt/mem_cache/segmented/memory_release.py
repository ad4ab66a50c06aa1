"""RL's release and resume of memory occupation (`/release_memory_occupation`,
`/resume_memory_occupation`) in segmented mode.

RL frameworks (verl, slime, OpenRLHF) drive SGLang as their rollout engine: every
training step they release the engine's memory (tags ``kv_cache``, ``weights``,
``cuda_graph``), update the weights and resume. Upstream flushes the cache and pauses
torch_memory_saver's regions by tag; segmented mode's memory lies outside them, so with
``kv_cache`` in the tags (or none) it gives back everything it committed: every KV
segment (each pool's first too), the req_to_token granules (the padding row's too), the
lazy cuda-graph buffers, the fixed RoPE caches and the spare handles, after upstream's
own release (the engine is idle and the device synchronized) and before the call
returns. The reserved address space stays, so captured graphs stay valid. While released
every KV page is withheld (requests queue, as for a full pool) and nothing is committed;
resume opens the pools again and the first requests commit on demand (the padding row
and the RoPE caches come back before the first batch).

Both run after upstream's function, with its result, called at its final return. (On the
CPU engine upstream's release fails in every mode at its
``torch.get_device_module().synchronize()``, ``torch.cuda`` there: an upstream matter
that this module leaves alone; the CPU test bed works around it.)
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sglang.srt.mem_cache.segmented.runtime import RUNTIME

if TYPE_CHECKING:
    from sglang.srt.managers.io_struct import (
        ReleaseMemoryOccupationReqInput,
        ReleaseMemoryOccupationReqOutput,
        ResumeMemoryOccupationReqInput,
        ResumeMemoryOccupationReqOutput,
    )
    from sglang.srt.managers.scheduler import Scheduler
    from sglang.srt.managers.scheduler_components.weight_updater import (
        SchedulerWeightUpdaterManager,
    )

logger = logging.getLogger(__name__)

KV_CACHE_TAG = "kv_cache"  # upstream's GPU_MEMORY_TYPE_KV_CACHE


def _names_kv(tags: list[str] | None) -> bool:
    """No tags means every tag (upstream's reading)."""
    return not tags or KV_CACHE_TAG in tags


def kv_released(
    result: ReleaseMemoryOccupationReqOutput,
    updater: SchedulerWeightUpdaterManager,
    recv_req: ReleaseMemoryOccupationReqInput,
    *args: Any,
    **kwargs: Any,
) -> ReleaseMemoryOccupationReqOutput:
    """Called where the scheduler's `release_memory_occupation` returns, with its
    result: once upstream released (the engine idle, the cache flushed, the device
    synchronized), with ``kv_cache`` in the tags in segmented mode, everything segmented
    mode committed goes back too."""
    if _names_kv(recv_req.tags) and RUNTIME.decision.segmented:
        release(updater.scheduler)
    return result


def kv_resumed(
    result: ResumeMemoryOccupationReqOutput,
    updater: SchedulerWeightUpdaterManager,
    recv_req: ResumeMemoryOccupationReqInput,
    *args: Any,
    **kwargs: Any,
) -> ResumeMemoryOccupationReqOutput:
    """Called where the scheduler's `resume_memory_occupation` returns, with its
    result: once upstream resumed, the pools open again (nothing is committed until
    requests need it)."""
    if _names_kv(recv_req.tags) and RUNTIME.state.kv_released:
        resume(updater.scheduler)
    return result


def release(scheduler: Scheduler | None) -> int:
    """Give back everything segmented mode committed (the engine is idle, the cache
    flushed, the device synchronized). Returns the bytes given back."""
    if scheduler is None or RUNTIME.state.kv_released:
        return 0
    before = committed_bytes(scheduler)
    allocator = RUNTIME.segmented_allocator(scheduler.token_to_kv_pool_allocator)
    segments = allocator.suspend() if allocator is not None else 0
    rows = RUNTIME.segmented_rows(scheduler.req_to_token_pool)
    if rows is not None:
        rows.release_all()
    RUNTIME.graph.release_all()
    RUNTIME.rope.release()
    RUNTIME.backings.trim_spares()
    RUNTIME.state.kv_released = True
    after = committed_bytes(scheduler)
    logger.info(
        "Memory occupation released (kv_cache): %d KV segments, req_to_token rows, cuda-graph "
        "buffers, RoPE caches and spare handles given back: %.2f -> %.2f MB committed.",
        segments,
        before / 1e6,
        after / 1e6,
    )
    return before - after


def resume(scheduler: Scheduler | None) -> None:
    """Open the pools again; the padding row and the RoPE caches come back before the
    first batch (`restore_before_first_batch`), KV segments as requests need them."""
    if scheduler is None:
        return
    allocator = RUNTIME.segmented_allocator(scheduler.token_to_kv_pool_allocator)
    if allocator is not None:
        allocator.resume()
    RUNTIME.state.kv_released = False
    RUNTIME.state.restore_pending = True
    logger.info(
        "Memory occupation resumed (kv_cache): KV committed as requests need it."
    )


def restore_before_first_batch(scheduler: Scheduler) -> None:
    """The first iteration with work after a resume: the padding row (zeroed) and the
    RoPE caches as they were, before anything reads them."""
    if not RUNTIME.state.restore_pending:
        return
    rows = RUNTIME.segmented_rows(scheduler.req_to_token_pool)
    if rows is not None:
        rows.restore_padding_row()
    RUNTIME.rope.restore()
    RUNTIME.state.restore_pending = False


def committed_bytes(scheduler: Scheduler) -> int:
    """What segmented mode holds committed now: KV segments, rows (where committed
    explicitly), cuda-graph buffers, RoPE caches and spare handles."""
    total = 0
    allocator = RUNTIME.segmented_allocator(scheduler.token_to_kv_pool_allocator)
    if allocator is not None:
        total += allocator.segment_stats()["committed_bytes"]
    rows = RUNTIME.segmented_rows(scheduler.req_to_token_pool)
    if rows is not None:
        total += rows.committed_bytes() or 0
    total += RUNTIME.graph.stats()["cuda_graph_buffers_committed_bytes"]
    total += RUNTIME.rope.committed_bytes
    device = getattr(RUNTIME.backings, "device", None)
    total += device.spare_bytes if device is not None else 0
    return total
