"""`--kv-alloc-mode auto` where upstream has sized the KV pool: clamp the context to what
one request can hold, choose static or segmented with exact numbers, say why.

`pool_config.mode_decided` hands auto over here; the choice weighs what static mode
allocates at start in proportion to the context (req_to_token and the attention
backend's cuda-graph buffers) against the KV budget (`row_room.decide_auto`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from sglang.srt.mem_cache.segmented import modes, pool_config
from sglang.srt.mem_cache.segmented.graph_layouts import (
    AttentionGraphShape,
    context_sized_graph_bytes,
)
from sglang.srt.mem_cache.segmented.pool_kind import kv_pool_bytes
from sglang.srt.mem_cache.segmented.row_room import decide_auto, req_to_token_bytes
from sglang.srt.mem_cache.segmented.runtime import RUNTIME

if TYPE_CHECKING:
    from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator
    from sglang.srt.model_executor.pool_configurator import MemoryPoolConfig

logger = logging.getLogger(__name__)


def auto_decided(
    config: MemoryPoolConfig,
    configurator: KVCacheConfigurator,
    request: modes.KvAllocRequest,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> MemoryPoolConfig:
    """auto: clamp the context to the pool upstream sized (sizing it again with the clamped
    context), choose the mode, open segmented mode's backings (static where the device
    cannot, if static fits), and settle the run-time room as `mode_decided` does."""
    self = configurator
    capacity = config.max_total_num_tokens // self.page_size * self.page_size
    context_len = self.model_config.context_len
    pool_bytes = kv_pool_bytes(self, config) or capacity
    # At the context asked for: decide_auto scales them to the context it clamps to.
    decision = decide_auto(
        requested_context=context_len,
        model_max_context=context_len,
        max_context_one_request=capacity,
        context_scaled_bytes_static=context_scaled_static_bytes(
            self, config, context_len
        ),
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
        config = pool_config.size_again(self, args, kwargs)
    static_bytes = context_scaled_static_bytes(self, config, decision.effective_context)
    mode = decision.mode
    reason = decision.reason
    if request.budget is not None and mode != modes.SEGMENTED:
        mode, reason = (
            modes.SEGMENTED,
            "--kv-budget: a shared budget is committed on demand",
        )
    if mode == modes.SEGMENTED:
        try:
            pool_config.open_backings(self)
        except modes.KvAllocModeError as exc:
            mode, reason = static_if_it_fits(
                self, config, static_bytes, reason, str(exc)
            )
        else:
            pool_config.open_budget(self, request)
    pool_config.decide_mode(self, request, mode, reason)
    logger.info("--kv-alloc-mode auto chose %s: %s", mode, reason)
    config = pool_config.settle_run_time_memory(self, config, args, kwargs)
    _context_within_pool(self, config)
    if self.model_config.context_len < context_len:
        RUNTIME.state.clamped_context_length = self.model_config.context_len
    return config


def _context_within_pool(
    configurator: KVCacheConfigurator, config: MemoryPoolConfig
) -> None:
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


def cuda_graph_bytes(configurator: KVCacheConfigurator, context_len: int) -> int:
    """The attention backend's context-sized cuda-graph buffers static mode allocates
    (0 off CUDA). Computed, not measured."""
    if not str(configurator.device).startswith("cuda"):
        return 0
    from sglang.srt.arg_groups.overrides import resolving_view

    model = configurator.model_config
    try:
        view = resolving_view(configurator.server_args)
        chunk = model.attention_chunk_size if model.is_local_attention_model else None
        # As the backends read them: the runner's sliding window, its MLA choice.
        shape = AttentionGraphShape(
            mla=bool(configurator.use_mla_backend),
            sliding_window=configurator.sliding_window_size is not None,
            encoder_decoder=bool(model.is_encoder_decoder),
            hybrid_swa=bool(model.is_hybrid_swa),
            local_attention_chunk=chunk,
            draft_tokens=int(view.speculative_num_draft_tokens or 0),
            topk=int(view.speculative_eagle_topk or 1),
            draft_steps=int(view.speculative_num_steps or 0),
        )
        max_bs = int(view.cuda_graph_config.decode.max_bs or 0)
        backend = str(view.attention_backend or "fa3")
        page = configurator.page_size
        return context_sized_graph_bytes(backend, max_bs, context_len, page, shape)
    except (ValueError, AttributeError) as exc:
        # Counted as 0: auto could then choose static where the buffers are gigabytes.
        logger.warning(
            "kv-alloc: the attention backend's cuda-graph buffers could not be "
            "estimated (%s); they are left out of auto's decision.",
            exc,
        )
        return 0


def context_scaled_static_bytes(
    configurator: KVCacheConfigurator, config: MemoryPoolConfig, context_len: int
) -> int:
    """What static mode allocates at start in proportion to the context (this process)."""
    from sglang.srt.mem_cache.kv_cache_configurator import (
        get_req_to_token_extra_context_len,
    )

    extra = get_req_to_token_extra_context_len()
    rows = config.max_running_requests + decode_pre_alloc_rows(configurator)
    total = req_to_token_bytes(rows, context_len, extra)
    return total + cuda_graph_bytes(configurator, context_len)


def decode_pre_alloc_rows(configurator: KVCacheConfigurator) -> int:
    """The rows a PD decode server's req_to_token holds beyond the running requests (upstream's
    `_build_req_to_token_pool`, whose reading of the settings this is), 0 elsewhere."""
    from sglang.srt.runtime_context import get_disagg

    disagg = get_disagg()
    if disagg.disaggregation_mode != "decode" and not disagg.enable_pd_role_switch:
        return 0
    return int(disagg.disaggregation_decode_extra_slots or 0)


def static_if_it_fits(
    configurator: KVCacheConfigurator,
    config: MemoryPoolConfig,
    static_bytes: int,
    reason: str,
    why_not: str,
) -> tuple[str, str]:
    """auto wanted segmented but the device cannot do it: static if its context-sized tables
    and the pool fit in free device memory, else a refusal with the numbers."""
    free = free_device_bytes(configurator)
    pool = kv_pool_bytes(configurator, config) or 0
    if free is None or static_bytes + pool <= free:
        return modes.STATIC, f"{reason}; but {why_not}: static fits, so static"
    raise modes.KvAllocModeError(
        f"--kv-alloc-mode auto: {why_not}, and static mode does not fit: its context-sized "
        f"tables take {static_bytes / 1e9:.2f} GB besides the {pool / 1e9:.2f} GB KV pool, with "
        f"{free / 1e9:.2f} GB free; lower --context-length or --max-running-requests"
    )


def free_device_bytes(configurator: KVCacheConfigurator) -> int | None:
    device = str(configurator.device)
    if not device.startswith("cuda"):
        return None
    free, _ = torch.cuda.mem_get_info()
    return int(free)
