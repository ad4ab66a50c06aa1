"""The req_to_token pools of segmented mode, built where upstream builds its own: the
lazy table (reserved, rows committed as requests use them) in place of upstream's, for
the target worker only."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sglang.srt.mem_cache.segmented.runtime import RUNTIME, builds_lazy_tables

if TYPE_CHECKING:
    from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool


def segmented_default_req_pool(
    self: KVCacheConfigurator, *args: Any, **kwargs: Any
) -> ReqToTokenPool | None:
    """Called first in `_build_default_req_pool`; what it builds, if anything, is
    returned instead: the lazy req_to_token in segmented mode (None: upstream's)."""
    if not builds_lazy_tables(self):
        return None
    from sglang.srt.mem_cache.segmented.lazy_req_to_token import SegmentedReqToTokenPool
    from sglang.srt.runtime_context import get_exec

    return SegmentedReqToTokenPool(
        size=kwargs["max_num_reqs"],
        max_context_len=self.model_config.context_len + kwargs["extra_max_context_len"],
        device=self.device,
        enable_memory_saver=get_exec().features.enable_memory_saver,
        agree=RUNTIME.settings.agree,
    )


def segmented_decode_req_pool(
    self: KVCacheConfigurator, *args: Any, **kwargs: Any
) -> ReqToTokenPool | None:
    """Called first in `_build_decode_req_pool` (a PD decode server); what it builds is
    returned instead: the lazy decode req_to_token in segmented mode, its pre-allocation
    rows included (None: upstream's)."""
    if not builds_lazy_tables(self):
        return None
    from sglang.srt.mem_cache.segmented.lazy_decode_req_to_token import (
        SegmentedDecodeReqToTokenPool,
    )
    from sglang.srt.runtime_context import get_exec

    return SegmentedDecodeReqToTokenPool(
        size=kwargs["max_num_reqs"],
        max_context_len=self.model_config.context_len + kwargs["extra_max_context_len"],
        device=self.device,
        enable_memory_saver=get_exec().features.enable_memory_saver,
        pre_alloc_size=kwargs["pre_alloc_size"],
    )
