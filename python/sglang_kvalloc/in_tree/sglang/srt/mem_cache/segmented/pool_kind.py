"""What upstream builds for this model: the KV pool kind, whether segmented mode commits
its KV on demand (and why not where it cannot), and the pool's bytes.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator
    from sglang.srt.model_executor.pool_configurator import MemoryPoolConfig
    from sglang.srt.server_args import ServerArgs

logger = logging.getLogger(__name__)

# Pool kinds whose KV memory segmented mode commits on demand (mechanism b). Every other kind
# keeps upstream's KV pool; the context-scaled tables are lazy for every kind (mechanism a).
KV_ON_DEMAND_KINDS = ("mha", "hybrid_swa", "mla")
# Transfer backends whose registrations follow the committed segments here ("fake" registers
# nothing). The others register the KV pool whole at start, so it stays whole under them.
SEGMENT_REGISTERING_BACKENDS = ("mooncake", "fake")
# The pool kinds tested under PD with their KV committed on demand.
PD_KV_ON_DEMAND_KINDS = ("mha",)


def kv_pool_kind(configurator: KVCacheConfigurator) -> tuple[str, str | None]:
    """The KV pool kind upstream builds for this model, and why segmented mode cannot
    commit its KV memory on demand (None where it can)."""
    from sglang.srt.configs.model_config import (
        is_deepseek_dsa,
        is_deepseek_v4,
        is_minimax_sparse,
    )

    hf_config = configurator.model_config.hf_config
    if is_deepseek_v4(hf_config):
        kind = "deepseek_v4"
    elif configurator.mambaish_config is not None:
        kind = "hybrid_linear"
    elif configurator.use_mla_backend and is_deepseek_dsa(hf_config):
        kind = "dsa"
    elif configurator.use_mla_backend and configurator.is_hybrid_swa:
        kind = "hybrid_mla_swa"
    elif configurator.use_mla_backend:
        kind = "mla"
    elif configurator.is_hybrid_swa:
        kind = "hybrid_swa"
    elif is_minimax_sparse(hf_config):
        kind = "minimax_sparse"
    else:
        kind = "mha"
    if kind not in KV_ON_DEMAND_KINDS:
        return kind, f"the {kind} KV pool is not segmented in this build"
    str_dtype = str(configurator.kv_cache_dtype_str)
    if str_dtype == "mxfp8" or "fp4" in str_dtype:
        return (
            kind,
            f"the block-scaled {str_dtype} KV cache is not segmented in this build",
        )
    if configurator.kv_shard_rank is not None:
        return kind, "KV-cache sharding uses its own pool, not segmented in this build"
    if not str(configurator.device).startswith(("cpu", "cuda")):
        return kind, f"device {configurator.device} has no segmented KV pool"
    if getattr(configurator.server_args, "enable_unified_memory", False):
        return kind, "--enable-unified-memory builds upstream's unified pool"
    pd_problem = pd_kv_on_demand_problem(configurator.server_args, kind)
    if pd_problem is not None:
        return kind, pd_problem
    return kind, _pool_class_problem(configurator, kind)


def pd_kv_on_demand_problem(server_args: ServerArgs, kind: str) -> str | None:
    """Why a PD server's KV pool cannot be committed on demand (None where it can, or
    where the server is not a PD one)."""
    pd_mode = str(getattr(server_args, "disaggregation_mode", "null") or "null")
    if pd_mode == "null":
        return None
    backend = str(getattr(server_args, "disaggregation_transfer_backend", "") or "")
    if backend not in SEGMENT_REGISTERING_BACKENDS:
        return (
            f"--disaggregation-transfer-backend {backend} registers the KV pool whole at start, "
            "so it is allocated whole in this build"
        )
    if kind not in PD_KV_ON_DEMAND_KINDS:
        return f"the {kind} KV pool under --disaggregation-mode {pd_mode} is allocated whole"
    if getattr(server_args, "disaggregation_decode_enable_radix_cache", False):
        # Its admission counts evictable cache, and `_pre_alloc` evicts only when the
        # allocator's available size (uncommitted segments included) falls short.
        return "--disaggregation-decode-enable-radix-cache keeps the KV pool whole"
    if int(getattr(server_args, "page_size", None) or 1) != 1:
        # Only page_size 1 hands out slots whose runs stop at segment starts
        # (`split_runs_at_segment_starts`); a transfer block must lie in one registered segment.
        return (
            f"a paged KV pool under --disaggregation-mode {pd_mode} is allocated whole"
        )
    return None


def _pool_class_problem(configurator: KVCacheConfigurator, kind: str) -> str | None:
    """Why the pool class upstream's `_build_token_to_kv_pool` will pick for ``kind`` is
    not the plain one segmented mode subclasses (asked of upstream's own choosers), else
    None."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool
    from sglang.srt.platforms import current_platform

    if kind == "mla":
        chosen = configurator._resolve_kv_pool_class(
            kind="mla", default=MLATokenToKVPool
        )
        plain: type = MLATokenToKVPool
    else:
        if configurator._page_major_enabled():
            return "the page-major KV layout (--enable-page-major-kv-layout) is not segmented"
        chosen = configurator._resolve_kv_pool_class(
            kind="mha", default=MHATokenToKVPool
        )
        plain = MHATokenToKVPool
    if chosen is not plain:
        return f"the {chosen.__name__} pool is not segmented in this build"
    if kind == "mha" and current_platform.is_cpu():
        # upstream's `_build_mha_quant_method`: fp8 on the CPU is stored through a quantizer.
        if configurator.kv_cache_dtype == torch.float8_e4m3fn:
            return "the CPU fp8 KV quantization is not segmented in this build"
    return None


def kv_pool_bytes(
    configurator: KVCacheConfigurator, config: MemoryPoolConfig
) -> int | None:
    """KV bytes of this rank's pool as upstream sized it (None for kinds not modelled here)."""
    from sglang.srt.runtime_context import get_parallel

    kind, _ = kv_pool_kind(configurator)
    mc = configurator.model_config
    itemsize = configurator.kv_cache_dtype.itemsize
    if kind == "mla":
        per_layer = (mc.kv_lora_rank + mc.qk_rope_head_dim) * itemsize
        return (
            per_layer
            * configurator.layer_info.num_effective_layers
            * config.max_total_num_tokens
        )
    if kind not in ("mha", "hybrid_swa"):
        return None
    heads = mc.get_num_kv_heads(
        get_parallel().attn_tp_size, get_parallel().attn_dcp_size
    )
    per_layer = heads * (mc.head_dim + mc.v_head_dim) * itemsize
    if kind == "mha":
        return (
            per_layer
            * configurator.layer_info.num_effective_layers
            * config.max_total_num_tokens
        )
    info = configurator.layer_info
    full = len(info.full_attention_layer_ids) * (config.full_max_total_num_tokens or 0)
    swa = len(info.swa_attention_layer_ids) * (config.swa_max_total_num_tokens or 0)
    return per_layer * (full + swa)
