"""Where upstream has sized the KV pool: the mode in force, decided once per process.

`KVCacheConfigurator._resolve_memory_pool_config` is where upstream learns the pool's
capacity. There segmented mode opens its backings (a device or a feature it cannot serve
is refused in one line), writes the process's `ModeDecision`, and keeps the memory it
commits at run time (RoPE caches, req_to_token rows) out of the pool's budget, sizing
the pool again through upstream's own method. `_profile_available_bytes` leaves that
room.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from sglang.srt.mem_cache.segmented import backing_choice, modes, scheduler_request
from sglang.srt.mem_cache.segmented.pool_kind import kv_pool_bytes, kv_pool_kind
from sglang.srt.mem_cache.segmented.refusals import (
    uncovered_graph_backend,
    unsupported_feature,
    unsupported_parallelism,
)
from sglang.srt.mem_cache.segmented.row_room import (
    req_to_token_bytes,
    req_to_token_room,
)
from sglang.srt.mem_cache.segmented.runtime import RUNTIME

if TYPE_CHECKING:
    from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator
    from sglang.srt.model_executor.pool_configurator import MemoryPoolConfig

logger = logging.getLogger(__name__)

# The configurators (by id) whose sizing `size_again` is running once more; upstream's
# KVCacheConfigurator has slots, so the mark cannot be an attribute of its own.
_SIZING_AGAIN: set[int] = set()


def size_again(
    configurator: KVCacheConfigurator, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> MemoryPoolConfig:
    """Upstream's `_resolve_memory_pool_config` once more (the budget measured again),
    where `mode_decided` passes its result through."""
    _SIZING_AGAIN.add(id(configurator))
    try:
        return configurator._resolve_memory_pool_config(*args, **kwargs)
    finally:
        _SIZING_AGAIN.discard(id(configurator))


def mode_decided(
    config: MemoryPoolConfig, self: KVCacheConfigurator, *args: Any, **kwargs: Any
) -> MemoryPoolConfig:
    """The pool config `_resolve_memory_pool_config` returns, once the mode is decided:
    upstream's own where static is in force; sized again where segmented mode keeps
    memory for its run-time commits (and, for auto, where the context was clamped)."""
    if self.is_draft_worker or id(self) in _SIZING_AGAIN:
        return config
    request = scheduler_request.note_request(self.server_args)
    _apply_segment_settings(self, request)
    RUNTIME.state.requested_context_length = getattr(
        self.server_args, modes.REQUESTED_CONTEXT_ATTR, self.server_args.context_length
    )
    if request.mode == modes.AUTO:
        from sglang.srt.mem_cache.segmented.auto_pools import auto_decided

        return auto_decided(config, self, request, args, kwargs)
    mode = modes.SEGMENTED if request.mode == modes.SEGMENTED else modes.STATIC
    if mode == modes.SEGMENTED:
        open_backings(self)  # a device that cannot do it says so now, in one line
        open_budget(self, request)
    # Where auto is not decided above (a build without it), it keeps upstream's pools.
    reason = "chosen explicitly" if request.mode == mode else "upstream's pools"
    decide_mode(self, request, mode, reason)
    return settle_run_time_memory(self, config, args, kwargs)


def settle_run_time_memory(
    configurator: KVCacheConfigurator,
    config: MemoryPoolConfig,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> MemoryPoolConfig:
    """Where memory is committed explicitly (a GPU), what the tables commit outside the
    KV pool is settled before the pool is sized: fixed RoPE caches committed as far as
    any position can reach (the pool's capacity; whole where static is in force), and
    the part of req_to_token's run-time room that static would not have taken from the
    slack (`req_to_token_room`) kept free. Upstream then measures the budget again, so
    the KV pool leaves them room."""
    state, rope, decision = RUNTIME.state, RUNTIME.rope, RUNTIME.decision
    explicit = decision.explicit_commits
    if not rope and not explicit:
        return config
    if decision.segmented:
        rope.commit_up_to(config.max_total_num_tokens)
    else:
        rope.complete()
    row_room = 0
    if explicit:
        from sglang.srt.mem_cache.kv_cache_configurator import (
            get_req_to_token_extra_context_len,
        )

        room = req_to_token_room(
            max_running_requests=config.max_running_requests,
            token_capacity=config.max_total_num_tokens,
            table_bytes=req_to_token_bytes(
                config.max_running_requests,
                configurator.model_config.context_len,
                get_req_to_token_extra_context_len(),
            ),
            granularity=RUNTIME.backings.granularity,
            kv_pool_bytes=kv_pool_bytes(configurator, config) or 0,
        )
        row_room = state.row_room_bytes = room.committed_at_most
        state.run_time_room_bytes = room.in_kv_budget
    state.rope_committed_bytes = rope.committed_bytes
    settled = size_again(configurator, args, kwargs)
    logger.info(
        "Memory committed outside the KV pool at run time: RoPE caches %.3f GB (committed "
        "now); req_to_token rows up to %.3f GB, of which %.3f GB kept free in the KV budget "
        "(the rest from the slack, as static's table). KV capacity %d -> %d tokens.",
        state.rope_committed_bytes / 1e9,
        row_room / 1e9,
        state.run_time_room_bytes / 1e9,
        config.max_total_num_tokens,
        settled.max_total_num_tokens,
    )
    return settled


def kv_budget_bytes(
    available: int, configurator: KVCacheConfigurator, *args: Any, **kwargs: Any
) -> int:
    """What `_profile_available_bytes` returns: the KV budget less the room segmented
    mode keeps free for req_to_token rows (0 in every other case)."""
    server_args = getattr(configurator, "server_args", None)
    if (
        not configurator.is_draft_worker
        and modes.budget_settings(server_args) is not None
    ):
        # Servers sharing a budget reserve it whole, whatever memory their start finds free.
        from sglang.srt.mem_cache.segmented import kv_budget  # --kv-budget: its own PR

        budgeted = kv_budget.pool_bytes(configurator)
        available = available if budgeted is None else budgeted
    room = RUNTIME.state.run_time_room_bytes
    if configurator.is_draft_worker or not room:
        return available
    return int(available) - room


def decide_mode(
    configurator: KVCacheConfigurator,
    request: modes.KvAllocRequest,
    mode: str,
    reason: str,
) -> None:
    """Write this process's one `ModeDecision`: the mode, why, the pool kind and whether
    its KV is committed on demand (foreseen from upstream's own pool choice), the
    backing."""
    kind, problem = kv_pool_kind(configurator)
    segmented = mode == modes.SEGMENTED
    faults_in = RUNTIME.backings.faults_in
    backing = modes.CPU_MMAP if faults_in else modes.CUDA_VMM
    decision = modes.ModeDecision(
        requested=request.mode,
        mode=mode,
        reason=reason,
        kv_pool_kind=kind,
        kv_pool_problem=problem,
        backing=backing if segmented else modes.NO_BACKING,
        explicit_commits=segmented and not faults_in,
    )
    RUNTIME.decide(decision)
    if segmented and problem is not None:
        logger.warning(
            "--kv-alloc-mode segmented: context-scaled tables are lazy, but the KV pool is "
            "allocated whole at start (%s).",
            problem,
        )


def _apply_segment_settings(
    configurator: KVCacheConfigurator, request: modes.KvAllocRequest
) -> None:
    segment = RUNTIME.settings
    segment.segment_tokens = request.segment_tokens
    segment.hold_off_s = request.hold_off_s
    segment.idle_cache_tokens = request.idle_cache_tokens
    segment.device = str(configurator.device)
    segment.agree = _rank_agreement()


def open_budget(
    configurator: KVCacheConfigurator, request: modes.KvAllocRequest
) -> None:
    """``--kv-budget``: this server's slot in the device's ledger, which its backings
    reserve in from now on (`shared_budget`, a PR of its own in the upstream series)."""
    if request.budget is None:
        return
    from sglang.srt.mem_cache.segmented import kv_budget

    kv_budget.open_budget(configurator)


def open_backings(configurator: KVCacheConfigurator) -> None:
    """The device's backing factory; a device that cannot back segmented mode, or an
    attention backend whose cuda-graph buffers it does not cover, is a one-line
    KvAllocModeError."""
    backing_choice.open_backings(str(configurator.device))
    explicit_commits = not RUNTIME.backings.faults_in
    problem = unsupported_parallelism(configurator) or unsupported_feature(
        configurator, explicit_commits=explicit_commits
    )
    if problem is not None:
        raise modes.KvAllocModeError(problem)
    backend = uncovered_graph_backend(configurator)
    if backend is not None:
        raise modes.KvAllocModeError(
            f"--kv-alloc-mode segmented does not cover the cuda-graph buffers of attention "
            f"backend {backend} (its decode graphs would allocate them at max batch x "
            f"context); use --attention-backend fa3 or triton (flashinfer too, except for MLA "
            f"models), or --cuda-graph-backend-decode=disabled"
        )


def _rank_agreement() -> Callable[[int], int]:
    """MIN of an int over the attention-TP ranks, which hold identical KV pools and make
    the same allocations: each commit's outcome and each shrink are agreed so they stay
    so."""
    from sglang.srt.runtime_context import get_parallel

    parallel = get_parallel()
    if int(getattr(parallel, "attn_tp_size", 1) or 1) <= 1:
        return lambda value: value
    return make_rank_agreement(parallel.attn_tp_group.cpu_group)


def make_rank_agreement(group: dist.ProcessGroup) -> Callable[[int], int]:
    """An all-reduce MIN of one int over ``group`` (upstream's gloo CPU group)."""

    def agree(value: int) -> int:
        flag = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        return int(flag.item())

    return agree
