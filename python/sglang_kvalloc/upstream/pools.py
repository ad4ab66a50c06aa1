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
from sglang.srt.mem_cache.segmented import modes

from sglang_kvalloc.core import planner
from sglang_kvalloc.upstream import backing_choice, settings, shared_budget
from sglang_kvalloc.upstream.inline import argument, instead, then
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
    request = settings.note_request(self.server_args)
    _apply_segment_settings(self, request)
    RUNTIME.state.requested_context_length = getattr(
        self.server_args, modes.REQUESTED_CONTEXT_ATTR, self.server_args.context_length
    )
    if request.mode != modes.AUTO:
        if request.mode == modes.SEGMENTED:
            _open_backings(self)  # a device that cannot do it says so now, in one line
            shared_budget.open_budget(self)
            _warn_graph_buffers(self)
        _decide(self, request, request.mode, "chosen explicitly")
        return _settle_run_time_memory(original, self, config, args, kwargs)

    capacity = config.max_total_num_tokens // self.page_size * self.page_size
    context_len = self.model_config.context_len
    pool_bytes = kv_pool_bytes(self, config) or capacity
    # At the context asked for: decide_auto scales them to the context it clamps to.
    decision = planner.decide_auto(
        requested_context=context_len,
        model_max_context=context_len,
        max_context_one_request=capacity,
        context_scaled_bytes_static=context_scaled_static_bytes(self, config, context_len),
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
    static_bytes = context_scaled_static_bytes(self, config, decision.effective_context)
    mode = decision.mode
    reason = decision.reason
    if request.budget is not None and mode != modes.SEGMENTED:
        mode, reason = modes.SEGMENTED, "--kv-budget: a shared budget is committed on demand"
    if mode == modes.SEGMENTED:
        try:
            _open_backings(self)
        except modes.KvAllocModeError as exc:
            mode, reason = static_if_it_fits(self, config, static_bytes, reason, str(exc))
        else:
            shared_budget.open_budget(self)
    _decide(self, request, mode, reason)
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


def kv_budget_bytes(
    available: int, configurator: KVCacheConfigurator, *args: Any, **kwargs: Any
) -> int:
    """AROUND `KVCacheConfigurator._profile_available_bytes` (then): the KV budget leaves the room
    segmented mode keeps free for req_to_token rows (0 in every other case)."""
    if not configurator.is_draft_worker:
        # Servers sharing a budget reserve it whole, whatever memory their start finds free.
        budgeted = shared_budget.pool_bytes(configurator)
        available = available if budgeted is None else budgeted
    room = RUNTIME.state.run_time_room_bytes
    if configurator.is_draft_worker or not room:
        return available
    return int(available) - room


around_profile_available_bytes = then(kv_budget_bytes)


def _decide(
    configurator: KVCacheConfigurator, request: modes.KvAllocRequest, mode: str, reason: str
) -> None:
    """Write this process's one `ModeDecision`: the mode, why, the pool kind and whether its
    KV is committed on demand (foreseen from upstream's own pool choice), the backing."""
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


def _open_backings(configurator: KVCacheConfigurator) -> None:
    """The device's backing factory; a device that cannot back segmented mode, or an attention
    backend whose cuda-graph buffers it does not cover, is a one-line KvAllocModeError."""
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
    return RUNTIME.decision.lazy_tables and not configurator.is_draft_worker


def _builds_kv_on_demand(configurator: KVCacheConfigurator) -> bool:
    """Whether this configurator's KV pool is the segment-committed one."""
    return RUNTIME.decision.kv_on_demand and not configurator.is_draft_worker


def _unforeseen_pool(what: str) -> modes.KvAllocModeError:
    """Upstream is building a pool the decision did not foresee (`pool_kind.kv_pool_kind`
    asks upstream's own choosers): a start-up error rather than a pool run the wrong way."""
    return modes.KvAllocModeError(
        f"--kv-alloc-mode segmented: upstream builds {what}, which the mode decision did not "
        "foresee; use --kv-alloc-mode static (and report this)"
    )


def segmented_default_req_pool(
    self: KVCacheConfigurator, *args: Any, **kwargs: Any
) -> ReqToTokenPool | None:
    """AROUND `_build_default_req_pool` (instead): the lazy req_to_token in segmented mode
    (None: upstream's)."""
    if not _builds_segmented(self):
        return None
    from sglang.srt.runtime_context import get_exec

    from sglang_kvalloc.upstream.lazy_req_to_token import SegmentedReqToTokenPool

    return SegmentedReqToTokenPool(
        size=kwargs["max_num_reqs"],
        max_context_len=self.model_config.context_len + kwargs["extra_max_context_len"],
        device=self.device,
        enable_memory_saver=get_exec().features.enable_memory_saver,
        agree=RUNTIME.settings.agree,
    )


around_build_default_req_pool = instead(segmented_default_req_pool)


def segmented_decode_req_pool(
    self: KVCacheConfigurator, *args: Any, **kwargs: Any
) -> ReqToTokenPool | None:
    """AROUND `_build_decode_req_pool` (instead; a PD decode server): the lazy decode
    req_to_token in segmented mode, its pre-allocation rows included (None: upstream's)."""
    if not _builds_segmented(self):
        return None
    from sglang.srt.runtime_context import get_exec

    from sglang_kvalloc.upstream.lazy_decode_req_to_token import SegmentedDecodeReqToTokenPool

    return SegmentedDecodeReqToTokenPool(
        size=kwargs["max_num_reqs"],
        max_context_len=self.model_config.context_len + kwargs["extra_max_context_len"],
        device=self.device,
        enable_memory_saver=get_exec().features.enable_memory_saver,
        pre_alloc_size=kwargs["pre_alloc_size"],
    )


around_build_decode_req_pool = instead(segmented_decode_req_pool)


def segmented_mha_pool_class(self: KVCacheConfigurator, *args: Any, **kwargs: Any) -> type[KVCache]:
    """AROUND `_build_mha_kv_pool` (argument `mha_pool_class`): the segmented MHA pool class
    in segmented mode (upstream's choice otherwise)."""
    pool_class = kwargs.get("mha_pool_class")
    if not _builds_kv_on_demand(self):
        return pool_class
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from sglang_kvalloc.upstream.segmented.kv_pools import SegmentedMHATokenToKVPool

    if pool_class is not MHATokenToKVPool or kwargs.get("quant_method") is not None:
        name = getattr(pool_class, "__name__", "?")
        quantized = " with a KV quantization method" if kwargs.get("quant_method") else ""
        raise _unforeseen_pool(f"the {name} pool{quantized}")
    return SegmentedMHATokenToKVPool


around_build_mha_kv_pool = argument("mha_pool_class", segmented_mha_pool_class)


def _segmented_class(
    chosen: type[KVCache], upstream_class: type[KVCache], segmented_class: type[KVCache]
) -> type[KVCache]:
    """The segmented subclass of the pool class upstream chose (its plain class, as the
    decision foresaw)."""
    if chosen is not upstream_class:
        raise _unforeseen_pool(f"the {getattr(chosen, '__name__', '?')} pool")
    return segmented_class


def segmented_swa_pool_class(self: KVCacheConfigurator, *args: Any, **kwargs: Any) -> type[KVCache]:
    """AROUND `_build_hybrid_swa_kv_pool` (argument `mha_pool_class`): upstream's `SWAKVPool`
    with both sub-pools (full and sliding-window) segment-committed, in segmented mode."""
    pool_class = kwargs.get("mha_pool_class")
    if not _builds_kv_on_demand(self):
        return pool_class
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from sglang_kvalloc.upstream.segmented.kv_pools import SegmentedMHATokenToKVPool

    return _segmented_class(pool_class, MHATokenToKVPool, SegmentedMHATokenToKVPool)


around_build_hybrid_swa_kv_pool = argument("mha_pool_class", segmented_swa_pool_class)


def segmented_mla_pool_class(self: KVCacheConfigurator, *args: Any, **kwargs: Any) -> type[KVCache]:
    """AROUND `_build_mla_kv_pool` (argument `mla_pool_class`): the segmented MLA (latent
    cache) pool in segmented mode."""
    pool_class = kwargs.get("mla_pool_class")
    if not _builds_kv_on_demand(self):
        return pool_class
    from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool

    from sglang_kvalloc.upstream.segmented.kv_pools import SegmentedMLATokenToKVPool

    return _segmented_class(pool_class, MLATokenToKVPool, SegmentedMLATokenToKVPool)


around_build_mla_kv_pool = argument("mla_pool_class", segmented_mla_pool_class)


def segment_aware_allocator(
    allocator: BaseTokenToKVPoolAllocator,
    self: KVCacheConfigurator,
    *args: Any,
    **kwargs: Any,
) -> BaseTokenToKVPoolAllocator:
    """AROUND `_build_token_to_kv_pool_allocator` (then): segment-aware allocators over a segmented
    pool (upstream's token, paged or hybrid SWA allocator, each replaced by its counterpart)."""
    pool = kwargs.get("token_to_kv_pool")
    if not _builds_kv_on_demand(self):
        return allocator
    from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
    from sglang.srt.mem_cache.allocator.swa import SWATokenToKVPoolAllocator
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

    from sglang_kvalloc.upstream.segmented.allocators import segmented_allocator_for
    from sglang_kvalloc.upstream.segmented.swa_allocator import (
        SegmentedSWATokenToKVPoolAllocator,
    )

    if type(allocator) is SWATokenToKVPoolAllocator:
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


around_build_allocator = then(segment_aware_allocator)


def record_configuration(
    result: KVCacheConfigResult,
    self: KVCacheConfigurator,
    *args: Any,
    **kwargs: Any,
) -> KVCacheConfigResult:
    """AROUND `KVCacheConfigurator.configure` (then): record and log what was built."""
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
    decision = RUNTIME.decision
    logger.info(
        "KV allocation mode: %s (requested %s; %s). KV capacity %d tokens, context length %d, "
        "max running requests %d, req_to_token %s %.3f GB. (a) context-scaled tables: %s. "
        "(b) %s KV pool: %s.",
        decision.mode,
        decision.requested,
        decision.reason,
        result.max_total_num_tokens,
        self.model_config.context_len,
        result.max_running_requests,
        "reserved" if decision.lazy_tables else "allocated",
        (state.req_to_token_bytes or 0) / 1e9,
        "lazy" if decision.lazy_tables else "allocated at start",
        decision.kv_pool_kind,
        "committed on demand"
        if decision.kv_on_demand
        else "allocated whole at start"
        + (f" ({decision.kv_pool_note})" if decision.kv_pool_note else ""),
    )
    return result


around_configure = then(record_configuration)


def after_get_internal_state(result: GetInternalStateReqOutput, *args: Any, **kwargs: Any) -> None:
    """AFTER `SchedulerInternalStateController.get_internal_state`: add `kv_alloc`."""
    state = getattr(result, "internal_state", None)
    if isinstance(state, dict):
        state["kv_alloc"] = RUNTIME.as_dict()
    return None
