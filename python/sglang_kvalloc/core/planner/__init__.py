"""Capacity planner: KV pool size, context-scaled start-up allocations, and the auto decision.

Stdlib only: no torch, no sglang, no GPU. Every formula mirrors a function of upstream SGLang
0.5.23; the docstrings name the file (under ``sglang/srt/``) and function. Where upstream
measures something at run time (free GPU memory, weight bytes), the planner estimates it and
says so. `test_planner_upstream.py` runs the planner with torch blocked and compares its
defaults with upstream's own functions.

One module per question: `model` (the model's shapes and KV bytes per token), `budget` (the
memory budget, the pool, the request slots), `layouts` (the context-sized buffers and what
segmented mode commits of them), `decision` (auto's choice), `plans` (the whole plan) and
`render` (the report the CLI prints).
"""

from __future__ import annotations

from sglang_kvalloc.core.planner.budget import (
    DEFAULT_PRE_LOAD_OVERHEAD_BYTES,
    GPU_PRESETS_MIB,
    VLM_CACHE_SIZE_MB,
    PoolSize,
    auto_mem_fraction_static,
    default_chunked_prefill_size,
    default_cuda_graph_max_bs,
    kv_budget_bytes,
    pool_from_budget,
    prefill_cuda_graph_sizes,
    resolve_max_num_reqs,
)
from sglang_kvalloc.core.planner.common import (
    GIB,
    MIB,
    PlanError,
)
from sglang_kvalloc.core.planner.decision import (
    AUTO_STATIC_MAX_SHARE,
    AutoDecision,
    decide_auto,
)
from sglang_kvalloc.core.planner.layouts import (
    ATTENTION_BACKENDS,
    GPU_VMM_GRANULARITY,
    VERIFY_MASK,
    Allocation,
    capture_batch,
    cuda_graph_allocations,
    draft_graph_batch,
    fa3_local_attention_layouts,
    fa3_page_table_layout,
    fa3_swa_spec_page_table_layout,
    flashinfer_custom_mask_layout,
    flashinfer_draft_kv_indices_layout,
    flashinfer_kv_indices_layout,
    lazy_graph_buffer_figures,
    req_to_token_allocation,
    req_to_token_extra,
    segmented_committed_bytes,
    triton_draft_kv_indices_layout,
    triton_kv_indices_layout,
    verify_mask_layout,
)
from sglang_kvalloc.core.planner.model import (
    CONTEXT_LENGTH_KEYS,
    DEFAULT_SWA_FULL_TOKENS_RATIO,
    KV_CACHE_DTYPES,
    LAYER_TYPES_SWA_ARCHS,
    LLAMA4_ARCHS,
    MODEL_DTYPE_BYTES,
    MULTIMODAL_ARCHS,
    KVPerToken,
    ModelSpec,
    builtin_config_dir,
    builtin_model_names,
    check_parallel,
    derive_context_length,
    estimate_weight_bytes_per_gpu,
    kv_dtype_bytes,
    kv_heads_per_gpu,
    kv_per_token,
    load_model_config,
    model_spec_from_config,
    pp_layer_range,
)
from sglang_kvalloc.core.planner.plans import (
    LLAMA4_BACKENDS,
    ModePlan,
    Plan,
    PlanInputs,
    SegmentedKv,
    plan,
    segmented_kv,
)
from sglang_kvalloc.core.planner.render import render

__all__ = [
    "ATTENTION_BACKENDS",
    "AUTO_STATIC_MAX_SHARE",
    "Allocation",
    "AutoDecision",
    "CONTEXT_LENGTH_KEYS",
    "DEFAULT_PRE_LOAD_OVERHEAD_BYTES",
    "DEFAULT_SWA_FULL_TOKENS_RATIO",
    "GIB",
    "GPU_PRESETS_MIB",
    "GPU_VMM_GRANULARITY",
    "KVPerToken",
    "KV_CACHE_DTYPES",
    "LAYER_TYPES_SWA_ARCHS",
    "LLAMA4_ARCHS",
    "LLAMA4_BACKENDS",
    "MIB",
    "MODEL_DTYPE_BYTES",
    "MULTIMODAL_ARCHS",
    "ModePlan",
    "ModelSpec",
    "Plan",
    "PlanError",
    "PlanInputs",
    "PoolSize",
    "SegmentedKv",
    "VERIFY_MASK",
    "VLM_CACHE_SIZE_MB",
    "auto_mem_fraction_static",
    "builtin_config_dir",
    "builtin_model_names",
    "capture_batch",
    "check_parallel",
    "cuda_graph_allocations",
    "decide_auto",
    "default_chunked_prefill_size",
    "default_cuda_graph_max_bs",
    "derive_context_length",
    "draft_graph_batch",
    "estimate_weight_bytes_per_gpu",
    "fa3_local_attention_layouts",
    "fa3_page_table_layout",
    "fa3_swa_spec_page_table_layout",
    "flashinfer_custom_mask_layout",
    "flashinfer_draft_kv_indices_layout",
    "flashinfer_kv_indices_layout",
    "kv_budget_bytes",
    "kv_dtype_bytes",
    "kv_heads_per_gpu",
    "kv_per_token",
    "lazy_graph_buffer_figures",
    "load_model_config",
    "model_spec_from_config",
    "plan",
    "pool_from_budget",
    "pp_layer_range",
    "prefill_cuda_graph_sizes",
    "render",
    "req_to_token_allocation",
    "req_to_token_extra",
    "resolve_max_num_reqs",
    "segmented_committed_bytes",
    "segmented_kv",
    "triton_draft_kv_indices_layout",
    "triton_kv_indices_layout",
    "verify_mask_layout",
]
