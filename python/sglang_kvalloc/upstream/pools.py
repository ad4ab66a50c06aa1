"""Hooks on upstream's KV cache configurator (scheduler / TP worker processes)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sglang_kvalloc import modes
from sglang_kvalloc.upstream.state import STATE

logger = logging.getLogger(__name__)


def around_configure(original: Callable[..., Any], self: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND `KVCacheConfigurator.configure`: build the pools for the chosen mode, and say so."""
    requested = modes.requested_mode(self.server_args)
    modes.validate_mode(requested)
    result = original(self, *args, **kwargs)
    if self.is_draft_worker:
        return result
    req_pool = result.req_to_token_pool
    req_to_token = getattr(req_pool, "req_to_token", None)
    STATE.requested_mode = requested
    STATE.mode = STATE.mode or requested
    STATE.effective_context_length = self.model_config.context_len
    STATE.token_capacity = result.max_total_num_tokens
    STATE.max_running_requests = result.max_running_requests
    if req_to_token is not None:
        STATE.req_to_token_bytes = req_to_token.numel() * req_to_token.element_size()
    logger.info(
        "KV allocation mode: %s (requested %s%s). KV capacity %d tokens, context length %d, "
        "max running requests %d, req_to_token table %.3f GB.",
        STATE.mode,
        requested,
        f"; {STATE.reason}" if STATE.reason else "",
        result.max_total_num_tokens,
        self.model_config.context_len,
        result.max_running_requests,
        (STATE.req_to_token_bytes or 0) / 1e9,
    )
    return result


def after_get_internal_state(result: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER `SchedulerInternalStateController.get_internal_state`: add `kv_alloc`."""
    state = getattr(result, "internal_state", None)
    if isinstance(state, dict):
        state["kv_alloc"] = STATE.as_dict()
    return None
