"""Hooks on upstream's KV cache configurator (scheduler / TP worker processes).

`_resolve_memory_pool_config` is where upstream learns the pool capacity; there `auto` clamps
the context and picks the mode with exact numbers. The `_build_*` hooks then build the pools
of the mode in force: upstream's own for static, the segmented subclasses for segmented.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from sglang_kvalloc import modes
from sglang_kvalloc.core import planner
from sglang_kvalloc.upstream import backings as backing_choice
from sglang_kvalloc.upstream import shared_budget
from sglang_kvalloc.upstream.pool_kind import (
    context_scaled_static_bytes,
    cuda_graph_bytes,
    kv_pool_bytes,
    kv_pool_kind,
)
from sglang_kvalloc.upstream.refusals import (
    static_if_it_fits,
    uncovered_graph_backend,
    unsupported_feature,
    unsupported_parallelism,
)
from sglang_kvalloc.upstream.runtime import RUNTIME

if TYPE_CHECKING:
    from sglang.srt.managers.io_struct import GetInternalStateReqOutput
    from sglang.srt.mem_cache.allocator.base import BaseTokenToKVPoolAllocator
    from sglang.srt.mem_cache.kv_cache_configurator import (
        KVCacheConfigResult,
        KVCacheConfigurator,
    )
    from sglang.srt.mem_cache.memory_pool import KVCache, ReqToTokenPool
    from sglang.srt.model_executor.pool_configurator import MemoryPoolConfig

logger = logging.getLogger(__name__)


def _effective_mode() -> str:
    return RUNTIME.state.mode or modes.STATIC


def _warn_graph_buffers(configurator: KVCacheConfigurator) -> None:
    """Segmented on a GPU: say what is still sized by the context (until the attention
    backends' buffers are lazy too), so an operator can act before capture runs short."""
    graph_bytes = cuda_graph_bytes(
        configurator, configurator.model_config.context_len, lazy_too=False
    )
    if graph_bytes > 1e9:
        logger.warning(
            "--kv-alloc-mode segmented: cuda-graph buffers this attention backend allocates "
            "at upstream's size (not lazy in this build): about %.1f GB at context %d "
            "(computed). If "
            "cuda-graph capture runs out of memory, lower --cuda-graph-max-bs or "
            "--context-length.",
            graph_bytes / 1e9,
            configurator.model_config.context_len,
        )


def around_resolve_memory_pool_config(
    original: Callable[..., MemoryPoolConfig],
    self: KVCacheConfigurator,
    *args: Any,
    **kwargs: Any,
) -> MemoryPoolConfig:
    """AROUND `KVCacheConfigurator._resolve_memory_pool_config`: decide the mode (and, for
    auto, the context) once upstream has sized the pool."""
    config = original(self, *args, **kwargs)
    if self.is_draft_worker:
        return config
    requested = modes.requested_mode(self.server_args)
    modes.validate_mode(requested)
    _apply_segment_settings(self)
    state = RUNTIME.state
    state.requested_mode = requested
    state.requested_context_length = getattr(
        self.server_args, modes.REQUESTED_CONTEXT_ATTR, self.server_args.context_length
    )
    if requested != modes.AUTO:
        if requested == modes.SEGMENTED:
            _open_backings(self)  # a device that cannot do it says so now, in one line
            shared_budget.open_budget(self)
            _warn_graph_buffers(self)
        state.mode = requested
        state.reason = "chosen explicitly"
        _note_mechanisms(self)
        return _settle_run_time_memory(original, self, config, args, kwargs)

    capacity = config.max_total_num_tokens // self.page_size * self.page_size
    context_len = self.model_config.context_len
    static_bytes = context_scaled_static_bytes(self, config, min(context_len, capacity))
    pool_bytes = kv_pool_bytes(self, config) or capacity
    decision = planner.decide_auto(
        requested_context=context_len,
        model_max_context=context_len,
        max_context_one_request=capacity,
        context_scaled_bytes_static=static_bytes,
        budget_bytes=pool_bytes,
    )
    if decision.clamped:
        logger.warning(
            "--kv-alloc-mode auto: context length %d clamped to %d: the KV pool holds %d "
            "tokens, so one request cannot use more.",
            context_len,
            decision.effective_context,
            capacity,
        )
        self.model_config.context_len = decision.effective_context
        # max running requests depends on the context; size again with the clamped one.
        config = original(self, *args, **kwargs)
    mode = decision.mode
    reason = decision.reason
    if modes.budget_settings(self.server_args) is not None and mode != modes.SEGMENTED:
        mode, reason = modes.SEGMENTED, "--kv-budget: a shared budget is committed on demand"
    if mode == modes.SEGMENTED:
        try:
            _open_backings(self)
        except modes.KvAllocModeError as exc:
            mode, reason = static_if_it_fits(self, config, static_bytes, reason, str(exc))
        else:
            shared_budget.open_budget(self)
    state.mode = mode
    state.reason = reason
    _note_mechanisms(self)
    logger.info("--kv-alloc-mode auto chose %s: %s", mode, reason)
    if mode == modes.SEGMENTED:
        _warn_graph_buffers(self)
    config = _settle_run_time_memory(original, self, config, args, kwargs)
    _context_within_pool(self, config)
    return config


def _settle_run_time_memory(
    original: Callable[..., MemoryPoolConfig],
    configurator: KVCacheConfigurator,
    config: MemoryPoolConfig,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> MemoryPoolConfig:
    """Where memory is committed explicitly (a GPU), what the tables commit outside the KV
    pool is settled before the pool is sized: fixed RoPE caches committed as far as any
    position can reach (the pool's capacity; whole where auto settled on static), and the
    part of req_to_token's run-time room that static would not have taken from the slack
    (`planner.req_to_token_room`) kept free. Upstream then measures the budget again, so the
    KV pool leaves them room; auto's context stays within the pool it ends with."""
    state, rope = RUNTIME.state, RUNTIME.rope
    segmented = state.mode == modes.SEGMENTED
    explicit = segmented and not RUNTIME.backings.faults_in
    if not rope and not explicit:
        return config
    if segmented:
        rope.commit_up_to(config.max_total_num_tokens)
    else:
        rope.complete()
    row_room = 0
    if explicit:
        from sglang.srt.mem_cache.kv_cache_configurator import (
            get_req_to_token_extra_context_len,
        )

        table = planner.req_to_token_allocation(
            config.max_running_requests,
            configurator.model_config.context_len,
            get_req_to_token_extra_context_len(),
        )
        room = planner.req_to_token_room(
            max_running_requests=config.max_running_requests,
            token_capacity=config.max_total_num_tokens,
            table_bytes=table.bytes,
            granularity=RUNTIME.backings.granularity,
            kv_pool_bytes=kv_pool_bytes(configurator, config) or 0,
        )
        row_room = state.row_room_bytes = room.committed_at_most
        state.run_time_room_bytes = room.in_kv_budget
    state.rope_committed_bytes = rope.committed_bytes
    settled = original(configurator, *args, **kwargs)
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


def _context_within_pool(configurator: KVCacheConfigurator, config: MemoryPoolConfig) -> None:
    """auto: the room settled after the clamp may leave the pool holding fewer tokens than
    the clamped context; one request must still fit, so the context follows the pool."""
    page = configurator.page_size
    capacity = config.max_total_num_tokens // page * page
    context = configurator.model_config.context_len
    if capacity >= context:
        return
    logger.warning(
        "--kv-alloc-mode auto: context length %d clamped to %d: the KV pool holds %d tokens "
        "once req_to_token's run-time room is kept free.",
        context,
        capacity,
        config.max_total_num_tokens,
    )
    configurator.model_config.context_len = capacity


def around_profile_available_bytes(
    original: Callable[..., int], configurator: KVCacheConfigurator, *args: Any, **kwargs: Any
) -> int:
    """AROUND `KVCacheConfigurator._profile_available_bytes`: the KV budget leaves the room
    segmented mode keeps free for req_to_token rows (0 in every other case)."""
    available = original(configurator, *args, **kwargs)
    if not configurator.is_draft_worker:
        # Servers sharing a budget reserve it whole, whatever memory their start finds free.
        budgeted = shared_budget.pool_bytes(configurator)
        available = available if budgeted is None else budgeted
    room = RUNTIME.state.run_time_room_bytes
    if configurator.is_draft_worker or not room:
        return available
    return int(available) - room


def _note_mechanisms(configurator: KVCacheConfigurator) -> None:
    """Record which of segmented mode's two mechanisms is in force: (a) the context-scaled
    tables lazy (every pool kind), (b) the KV pool committed on demand (supported kinds)."""
    kind, why_not = kv_pool_kind(configurator)
    state = RUNTIME.state
    segmented = state.mode == modes.SEGMENTED
    state.kv_pool_kind = kind
    state.lazy_tables = segmented
    state.kv_on_demand = segmented
    state.kv_on_demand_note = f"the {kind} KV pool is committed segment by segment"
    if not segmented:
        state.kv_on_demand_note = ""
    elif why_not is not None:
        _keep_upstream_pool(why_not)


def _apply_segment_settings(configurator: KVCacheConfigurator) -> None:
    server_args = configurator.server_args
    settings = RUNTIME.settings
    settings.segment_tokens = modes.segment_tokens(server_args)
    settings.hold_off_s = modes.segment_hold_off_s(server_args)
    settings.idle_cache_tokens = modes.idle_cache_tokens(server_args)
    settings.device = str(configurator.device)
    settings.agree = _rank_agreement()


def _open_backings(configurator: KVCacheConfigurator) -> None:
    """The device's backing factory; a device that cannot back segmented mode, or an attention
    backend whose cuda-graph buffers it does not cover, is a one-line KvAllocModeError."""
    backing_choice.open_backings(str(configurator.device))
    problem = unsupported_parallelism(configurator) or unsupported_feature(configurator)
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
    """MIN of an int over the attention-TP ranks, which hold identical KV pools and make the
    same allocations: each commit's outcome and each shrink are agreed so they stay so."""
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


def _builds_segmented(configurator: KVCacheConfigurator) -> bool:
    """Whether this configurator's tables are the lazy ones (the target worker)."""
    return _effective_mode() == modes.SEGMENTED and not configurator.is_draft_worker


def _builds_kv_on_demand(configurator: KVCacheConfigurator) -> bool:
    """Whether this configurator's KV pool is the segment-committed one."""
    return _builds_segmented(configurator) and RUNTIME.state.kv_on_demand


def _keep_upstream_pool(why: str) -> None:
    """A pool variant found only while building: its KV stays upstream's, said once."""
    RUNTIME.state.kv_on_demand = False
    RUNTIME.state.kv_on_demand_note = why
    logger.warning(
        "--kv-alloc-mode segmented: context-scaled tables are lazy, but the KV pool is "
        "allocated whole at start (%s).",
        why,
    )


def around_build_default_req_pool(
    original: Callable[..., ReqToTokenPool], self: KVCacheConfigurator, *args: Any, **kwargs: Any
) -> ReqToTokenPool:
    """AROUND `_build_default_req_pool`: segmented req_to_token in segmented mode."""
    if not _builds_segmented(self):
        return original(self, *args, **kwargs)
    from sglang.srt.runtime_context import get_exec

    from sglang_kvalloc.upstream.row_pool import SegmentedReqToTokenPool

    return SegmentedReqToTokenPool(
        size=kwargs["max_num_reqs"],
        max_context_len=self.model_config.context_len + kwargs["extra_max_context_len"],
        device=self.device,
        enable_memory_saver=get_exec().features.enable_memory_saver,
        agree=RUNTIME.settings.agree,
    )


def around_build_mha_kv_pool(
    original: Callable[..., KVCache], self: KVCacheConfigurator, *args: Any, **kwargs: Any
) -> KVCache:
    """AROUND `_build_mha_kv_pool`: the segmented MHA pool class in segmented mode."""
    if not _builds_kv_on_demand(self):
        return original(self, *args, **kwargs)
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from sglang_kvalloc.upstream.segmented.kv_pools import SegmentedMHATokenToKVPool

    pool_class = kwargs.get("mha_pool_class")
    if pool_class is not MHATokenToKVPool or kwargs.get("quant_method") is not None:
        name = getattr(pool_class, "__name__", "?")
        _keep_upstream_pool(
            f"the {name} pool"
            + (" with a KV quantization method" if pool_class else "")
            + " is not segmented in this build"
        )
        return original(self, *args, **kwargs)
    kwargs["mha_pool_class"] = SegmentedMHATokenToKVPool
    return original(self, *args, **kwargs)


def _with_segmented_class(
    original: Callable[..., KVCache],
    configurator: KVCacheConfigurator,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    key: str,
    upstream_class: type[KVCache],
    segmented_class: type[KVCache],
) -> KVCache:
    """Call a `_build_*_kv_pool` with ``kwargs[key]`` (the pool class upstream chose) swapped
    for its segmented subclass, where it is upstream's plain class; else upstream's pool."""
    chosen = kwargs.get(key)
    if chosen is not upstream_class:
        name = getattr(chosen, "__name__", "?")
        _keep_upstream_pool(f"the {name} pool is not segmented in this build")
    else:
        kwargs[key] = segmented_class
    return original(configurator, *args, **kwargs)


def around_build_hybrid_swa_kv_pool(
    original: Callable[..., KVCache], self: KVCacheConfigurator, *args: Any, **kwargs: Any
) -> KVCache:
    """AROUND `_build_hybrid_swa_kv_pool`: upstream's `SWAKVPool` with both sub-pools (full
    and sliding-window) segment-committed, in segmented mode."""
    if not _builds_kv_on_demand(self):
        return original(self, *args, **kwargs)
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from sglang_kvalloc.upstream.segmented.kv_pools import SegmentedMHATokenToKVPool

    return _with_segmented_class(
        original, self, args, kwargs, "mha_pool_class", MHATokenToKVPool, SegmentedMHATokenToKVPool
    )


def around_build_mla_kv_pool(
    original: Callable[..., KVCache], self: KVCacheConfigurator, *args: Any, **kwargs: Any
) -> KVCache:
    """AROUND `_build_mla_kv_pool`: the segmented MLA (latent cache) pool in segmented mode."""
    if not _builds_kv_on_demand(self):
        return original(self, *args, **kwargs)
    from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool

    from sglang_kvalloc.upstream.segmented.kv_pools import SegmentedMLATokenToKVPool

    return _with_segmented_class(
        original, self, args, kwargs, "mla_pool_class", MLATokenToKVPool, SegmentedMLATokenToKVPool
    )


def around_build_allocator(
    original: Callable[..., BaseTokenToKVPoolAllocator],
    self: KVCacheConfigurator,
    *args: Any,
    **kwargs: Any,
) -> BaseTokenToKVPoolAllocator:
    """AROUND `_build_token_to_kv_pool_allocator`: segment-aware allocators over a segmented
    pool (upstream's token, paged or hybrid SWA allocator, each replaced by its counterpart)."""
    allocator = original(self, *args, **kwargs)
    pool = kwargs.get("token_to_kv_pool")
    if _effective_mode() != modes.SEGMENTED or self.is_draft_worker:
        return allocator
    from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
    from sglang.srt.mem_cache.allocator.swa import SWATokenToKVPoolAllocator
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

    from sglang_kvalloc.upstream.segmented.allocators import segmented_allocator_for
    from sglang_kvalloc.upstream.segmented.swa_allocator import (
        SegmentedSWATokenToKVPoolAllocator,
    )

    if type(allocator) is SWATokenToKVPoolAllocator and hasattr(
        getattr(pool, "full_kv_pool", None), "segmented_buffers"
    ):
        return SegmentedSWATokenToKVPoolAllocator(
            allocator.size_full,
            allocator.size_swa,
            allocator.page_size,
            allocator.dtype,
            allocator.device,
            pool,
            allocator.need_sort,
            kwargs.get("req_to_token_pool"),
        )
    if not hasattr(pool, "segmented_buffers"):
        return allocator
    if type(allocator) in (TokenToKVPoolAllocator, PagedTokenToKVPoolAllocator):
        return segmented_allocator_for(
            allocator.size,
            allocator.page_size,
            allocator.dtype,
            allocator.device,
            pool,
            allocator.need_sort,
        )
    raise modes.KvAllocModeError(
        "--kv-alloc-mode segmented supports upstream's token, paged and hybrid SWA "
        f"allocators only (got {type(allocator).__name__})"
    )


def around_configure(
    original: Callable[..., KVCacheConfigResult],
    self: KVCacheConfigurator,
    *args: Any,
    **kwargs: Any,
) -> KVCacheConfigResult:
    """AROUND `KVCacheConfigurator.configure`: record and log what was built."""
    result = original(self, *args, **kwargs)
    if self.is_draft_worker:
        return result
    req_to_token = getattr(result.req_to_token_pool, "req_to_token", None)
    state = RUNTIME.state
    state.effective_context_length = self.model_config.context_len
    state.token_capacity = result.max_total_num_tokens
    state.max_running_requests = result.max_running_requests
    if req_to_token is not None:
        state.req_to_token_bytes = req_to_token.numel() * req_to_token.element_size()
    state.allocator = result.token_to_kv_pool_allocator
    state.req_to_token_pool = result.req_to_token_pool
    lazy_rows = hasattr(result.req_to_token_pool, "resident_bytes")
    if state.kv_on_demand and not hasattr(state.allocator, "segment_stats"):
        _keep_upstream_pool(f"{type(state.allocator).__name__} is not segmented in this build")
    logger.info(
        "KV allocation mode: %s (requested %s; %s). KV capacity %d tokens, context length %d, "
        "max running requests %d, req_to_token %s %.3f GB. (a) context-scaled tables: %s. "
        "(b) %s KV pool: %s.",
        state.mode,
        state.requested_mode,
        state.reason,
        result.max_total_num_tokens,
        self.model_config.context_len,
        result.max_running_requests,
        "reserved" if lazy_rows else "allocated",
        (state.req_to_token_bytes or 0) / 1e9,
        "lazy" if state.lazy_tables else "allocated at start",
        state.kv_pool_kind,
        "committed on demand"
        if state.kv_on_demand
        else "allocated whole at start"
        + (f" ({state.kv_on_demand_note})" if state.kv_on_demand_note else ""),
    )
    return result


def after_get_internal_state(result: GetInternalStateReqOutput, *args: Any, **kwargs: Any) -> None:
    """AFTER `SchedulerInternalStateController.get_internal_state`: add `kv_alloc`."""
    state = getattr(result, "internal_state", None)
    if isinstance(state, dict):
        state["kv_alloc"] = RUNTIME.as_dict()
    return None
