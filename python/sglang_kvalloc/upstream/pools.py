"""Hooks on upstream's KV cache configurator (scheduler / TP worker processes).

`_resolve_memory_pool_config` is where upstream learns the pool capacity; there `auto` clamps
the context and picks the mode with exact numbers. The `_build_*` hooks then build the pools
of the mode in force: upstream's own for static, the segmented subclasses for segmented.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sglang_kvalloc import modes
from sglang_kvalloc.core import planner
from sglang_kvalloc.upstream.state import STATE

logger = logging.getLogger(__name__)


def _effective_mode() -> str:
    return STATE.mode or modes.STATIC


def _mha_cell_bytes(configurator: Any) -> int | None:
    """KV bytes per token per rank for a plain MHA pool, or None for other pool kinds."""
    if configurator.use_mla_backend or configurator.is_hybrid_swa:
        return None
    from sglang.srt.runtime_context import get_parallel

    mc = configurator.model_config
    heads = mc.get_num_kv_heads(get_parallel().attn_tp_size, get_parallel().attn_dcp_size)
    layers = configurator.layer_info.num_effective_layers
    return heads * (mc.head_dim + mc.v_head_dim) * layers * configurator.kv_cache_dtype.itemsize


def _cuda_graph_bytes(configurator: Any, context_len: int, *, lazy_too: bool = True) -> int:
    """The attention backend's context-sized cuda-graph buffers, by the planner's formulas (0
    off CUDA); without ``lazy_too``, only those segmented mode still allocates in full.
    Computed, not measured."""
    if not str(configurator.device).startswith("cuda"):
        return 0
    try:
        from sglang.srt.arg_groups.overrides import resolving_view

        view = resolving_view(configurator.server_args)
        spec = planner.model_spec_from_config(configurator.model_config.hf_config.to_dict())
        max_bs = int(view.cuda_graph_config.decode.max_bs or 0)
        backend = str(view.attention_backend or "fa3")
        allocations = planner.cuda_graph_allocations(
            spec,
            backend=backend,
            max_bs=max_bs,
            context_len=context_len,
            page_size=configurator.page_size,
        )
    except (planner.PlanError, KeyError, ValueError, AttributeError) as exc:
        logger.debug("cuda-graph buffer estimate skipped: %s", exc)
        return 0
    return sum(a.bytes for a in allocations if lazy_too or a.lazy is None)


def _context_scaled_static_bytes(configurator: Any, config: Any, context_len: int) -> int:
    """What static mode allocates at start in proportion to the context (this process)."""
    from sglang.srt.mem_cache.kv_cache_configurator import get_req_to_token_extra_context_len

    extra = get_req_to_token_extra_context_len()
    total = planner.req_to_token_allocation(config.max_running_requests, context_len, extra).bytes
    return total + _cuda_graph_bytes(configurator, context_len)


def _warn_graph_buffers(configurator: Any) -> None:
    """Segmented on a GPU: say what is still sized by the context (until the attention
    backends' buffers are lazy too), so an operator can act before capture runs short."""
    graph_bytes = _cuda_graph_bytes(
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
    original: Callable[..., Any], self: Any, *args: Any, **kwargs: Any
) -> Any:
    """AROUND `KVCacheConfigurator._resolve_memory_pool_config`: decide the mode (and, for
    auto, the context) once upstream has sized the pool."""
    config = original(self, *args, **kwargs)
    if self.is_draft_worker:
        return config
    requested = modes.requested_mode(self.server_args)
    modes.validate_mode(requested)
    _apply_segment_settings(self)
    STATE.requested_mode = requested
    STATE.requested_context_length = getattr(
        self.server_args, modes.REQUESTED_CONTEXT_ATTR, self.server_args.context_length
    )
    if requested != modes.AUTO:
        if requested == modes.SEGMENTED:
            _open_backings(self)  # a device that cannot do it says so now, in one line
            _warn_graph_buffers(self)
        STATE.mode = requested
        STATE.reason = "chosen explicitly"
        return config

    capacity = config.max_total_num_tokens // self.page_size * self.page_size
    context_len = self.model_config.context_len
    cell = _mha_cell_bytes(self)
    static_bytes = _context_scaled_static_bytes(self, config, min(context_len, capacity))
    decision = planner.decide_auto(
        requested_context=context_len,
        model_max_context=context_len,
        max_context_one_request=capacity,
        context_scaled_bytes_static=static_bytes,
        budget_bytes=capacity * (cell or 1),
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
    if mode == modes.SEGMENTED and cell is None:
        mode = modes.STATIC
        reason += "; segmented supports MHA pools only, so static"
    if mode == modes.SEGMENTED:
        try:
            _open_backings(self)
        except modes.KvAllocModeError as exc:
            mode, reason = _static_if_it_fits(self, config, static_bytes, reason, str(exc))
    STATE.mode = mode
    STATE.reason = reason
    logger.info("--kv-alloc-mode auto chose %s: %s", mode, reason)
    if mode == modes.SEGMENTED:
        _warn_graph_buffers(self)
    return config


def _apply_segment_settings(configurator: Any) -> None:
    from sglang_kvalloc.upstream.segmented import SETTINGS

    server_args = configurator.server_args
    SETTINGS.segment_tokens = modes.segment_tokens(server_args)
    SETTINGS.hold_off_s = modes.segment_hold_off_s(server_args)
    SETTINGS.idle_cache_tokens = modes.idle_cache_tokens(server_args)
    SETTINGS.device = str(configurator.device)
    SETTINGS.agree = _rank_agreement()


def _open_backings(configurator: Any) -> None:
    """The device's backing factory; a device that cannot back segmented mode is a one-line
    KvAllocModeError."""
    from sglang_kvalloc.upstream.segmented import open_backings

    open_backings(str(configurator.device))


def _static_if_it_fits(
    configurator: Any, config: Any, static_bytes: int, reason: str, why_not: str
) -> tuple[str, str]:
    """auto wanted segmented but the device cannot do it: static if its context-sized tables
    and the pool fit in free device memory, else a refusal with the numbers."""
    free = _free_device_bytes(configurator)
    pool = config.max_total_num_tokens * (_mha_cell_bytes(configurator) or 0)
    if free is None or static_bytes + pool <= free:
        return modes.STATIC, f"{reason}; but {why_not}: static fits, so static"
    raise modes.KvAllocModeError(
        f"--kv-alloc-mode auto: {why_not}, and static mode does not fit: its context-sized "
        f"tables take {static_bytes / 1e9:.2f} GB besides the {pool / 1e9:.2f} GB KV pool, with "
        f"{free / 1e9:.2f} GB free; lower --context-length or --max-running-requests"
    )


def _free_device_bytes(configurator: Any) -> int | None:
    device = str(configurator.device)
    if not device.startswith("cuda"):
        return None
    import torch

    free, _ = torch.cuda.mem_get_info()
    return int(free)


def _rank_agreement() -> Callable[[int], int]:
    """MIN of an int over the attention-TP ranks, which hold identical KV pools and make the
    same allocations: each commit's outcome and each shrink are agreed so they stay so."""
    from sglang.srt.runtime_context import get_parallel

    parallel = get_parallel()
    if int(getattr(parallel, "attn_tp_size", 1) or 1) <= 1:
        return lambda value: value
    return make_rank_agreement(parallel.attn_tp_group.cpu_group)


def make_rank_agreement(group: Any) -> Callable[[int], int]:
    """An all-reduce MIN of one int over ``group`` (upstream's gloo CPU group)."""
    import torch
    import torch.distributed as dist

    def agree(value: int) -> int:
        flag = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        return int(flag.item())

    return agree


def _builds_segmented(configurator: Any) -> bool:
    """Whether this configurator's pools are the segmented ones (the target worker)."""
    return _effective_mode() == modes.SEGMENTED and not configurator.is_draft_worker


def around_build_default_req_pool(
    original: Callable[..., Any], self: Any, *args: Any, **kwargs: Any
) -> Any:
    """AROUND `_build_default_req_pool`: segmented req_to_token in segmented mode."""
    if not _builds_segmented(self):
        return original(self, *args, **kwargs)
    from sglang.srt.runtime_context import get_exec

    from sglang_kvalloc.upstream.segmented import SegmentedReqToTokenPool

    return SegmentedReqToTokenPool(
        size=kwargs["max_num_reqs"],
        max_context_len=self.model_config.context_len + kwargs["extra_max_context_len"],
        device=self.device,
        enable_memory_saver=get_exec().features.enable_memory_saver,
    )


def around_build_mha_kv_pool(
    original: Callable[..., Any], self: Any, *args: Any, **kwargs: Any
) -> Any:
    """AROUND `_build_mha_kv_pool`: the segmented MHA pool class in segmented mode."""
    if not _builds_segmented(self):
        return original(self, *args, **kwargs)
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from sglang_kvalloc.upstream.segmented import SegmentedMHATokenToKVPool

    if (
        kwargs.get("mha_pool_class") is not MHATokenToKVPool
        or kwargs.get("quant_method") is not None
        or self.kv_cache_dtype_str == "mxfp8"
        or self.kv_shard_rank is not None
    ):
        raise modes.KvAllocModeError(
            "--kv-alloc-mode segmented supports the plain MHA KV pool only "
            f"(got {getattr(kwargs.get('mha_pool_class'), '__name__', '?')})"
        )
    kwargs["mha_pool_class"] = SegmentedMHATokenToKVPool
    return original(self, *args, **kwargs)


def around_build_allocator(
    original: Callable[..., Any], self: Any, *args: Any, **kwargs: Any
) -> Any:
    """AROUND `_build_token_to_kv_pool_allocator`: segment-aware allocators in segmented mode."""
    allocator = original(self, *args, **kwargs)
    pool = kwargs.get("token_to_kv_pool")
    if _effective_mode() != modes.SEGMENTED or not hasattr(pool, "segmented_buffers"):
        return allocator
    from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

    from sglang_kvalloc.upstream.segmented import (
        SegmentedPagedTokenToKVPoolAllocator,
        SegmentedTokenToKVPoolAllocator,
    )

    if type(allocator) is TokenToKVPoolAllocator:
        return SegmentedTokenToKVPoolAllocator(
            allocator.size, allocator.dtype, allocator.device, pool, allocator.need_sort
        )
    if type(allocator) is PagedTokenToKVPoolAllocator:
        return SegmentedPagedTokenToKVPoolAllocator(
            allocator.size,
            allocator.page_size,
            allocator.dtype,
            allocator.device,
            pool,
            allocator.need_sort,
        )
    raise modes.KvAllocModeError(
        "--kv-alloc-mode segmented supports upstream's token and paged allocators only "
        f"(got {type(allocator).__name__})"
    )


def around_configure(original: Callable[..., Any], self: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND `KVCacheConfigurator.configure`: record and log what was built."""
    result = original(self, *args, **kwargs)
    if self.is_draft_worker:
        return result
    req_to_token = getattr(result.req_to_token_pool, "req_to_token", None)
    STATE.effective_context_length = self.model_config.context_len
    STATE.token_capacity = result.max_total_num_tokens
    STATE.max_running_requests = result.max_running_requests
    if req_to_token is not None:
        STATE.req_to_token_bytes = req_to_token.numel() * req_to_token.element_size()
    STATE.allocator = result.token_to_kv_pool_allocator
    STATE.req_to_token_pool = result.req_to_token_pool
    logger.info(
        "KV allocation mode: %s (requested %s; %s). KV capacity %d tokens, context length %d, "
        "max running requests %d, req_to_token %s %.3f GB.",
        STATE.mode,
        STATE.requested_mode,
        STATE.reason,
        result.max_total_num_tokens,
        self.model_config.context_len,
        result.max_running_requests,
        "reserved" if STATE.mode == modes.SEGMENTED else "allocated",
        (STATE.req_to_token_bytes or 0) / 1e9,
    )
    return result


def after_get_internal_state(result: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER `SchedulerInternalStateController.get_internal_state`: add `kv_alloc`."""
    state = getattr(result, "internal_state", None)
    if isinstance(state, dict):
        state["kv_alloc"] = STATE.as_dict()
    return None
