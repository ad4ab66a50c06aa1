"""What was built, for the operator: one start-up line with the mode, why, the capacity
and the tables; `kv_alloc` in the scheduler's internal state (`/server_info`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sglang.srt.mem_cache.segmented.runtime import RUNTIME

if TYPE_CHECKING:
    from sglang.srt.managers.io_struct import GetInternalStateReqOutput
    from sglang.srt.mem_cache.kv_cache_configurator import (
        KVCacheConfigResult,
        KVCacheConfigurator,
    )

logger = logging.getLogger(__name__)


def record_configuration(
    result: KVCacheConfigResult,
    self: KVCacheConfigurator,
    *args: Any,
    **kwargs: Any,
) -> KVCacheConfigResult:
    """Called where `KVCacheConfigurator.configure` returns, with its result: record and
    log what was built."""
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


def after_get_internal_state(
    result: GetInternalStateReqOutput, *args: Any, **kwargs: Any
) -> None:
    """Called last in `SchedulerInternalStateController.get_internal_state`: add
    `kv_alloc`."""
    state = getattr(result, "internal_state", None)
    if isinstance(state, dict):
        state["kv_alloc"] = RUNTIME.as_dict()
    return None
