"""The memory budget: upstream's device-dependent defaults (mem_fraction_static, cuda-graph
max batch, chunked prefill size), the KV byte budget, the pool it holds and the request slots."""

from __future__ import annotations

import math
from dataclasses import dataclass

from sglang_kvalloc.core.planner.common import GIB, PlanError
from sglang_kvalloc.core.planner.model import DEFAULT_SWA_FULL_TOKENS_RATIO, KVPerToken
from sglang_kvalloc.core.planner.server_rules import row_room as _row_room

RowRoom = _row_room.RowRoom
req_to_token_room = _row_room.req_to_token_room

# Estimate of what is already resident before weights load (CUDA context, NCCL and
# custom-allreduce buffers). Upstream measures it (distributed/bootstrap.py
# measure_pre_model_load_memory); the planner cannot, so it is a documented guess.
DEFAULT_PRE_LOAD_OVERHEAD_BYTES = 1 * GIB
# nvidia-smi memory.total (MiB) as reported for these parts; upstream reads the same figure in
# utils/common.py get_nvgpu_memory_capacity.
GPU_PRESETS_MIB: dict[str, int] = {"h100": 81559, "h200": 143771}
# SGLANG_VLM_CACHE_SIZE_MB default (environ.py), reserved by mm_runtime_reservation_gb.
VLM_CACHE_SIZE_MB = 100


def default_chunked_prefill_size(gpu_mem_mib: float | None) -> int:
    """Mirrors arg_groups/memory_hook.py handle_gpu_memory_settings (chunked_prefill_size)."""
    if gpu_mem_mib is None:
        return 4096
    if gpu_mem_mib < 20 * 1024:
        return 2048
    if gpu_mem_mib < 60 * 1024:
        return 4096
    if gpu_mem_mib < 160 * 1024:
        return 8192
    return 16384


def default_cuda_graph_max_bs(
    gpu_mem_mib: float | None, tp: int, max_running_requests: int | None = None
) -> int:
    """Decode cuda-graph max_bs; mirrors memory_hook.py handle_gpu_memory_settings.

    The default is capped by --max-running-requests when that is smaller.
    """
    if gpu_mem_mib is None:
        bs = 160
    elif gpu_mem_mib < 20 * 1024:
        bs = 8
    elif gpu_mem_mib < 35 * 1024:
        bs = 48 if tp < 4 else 160
    elif gpu_mem_mib < 60 * 1024:
        bs = 32 if tp < 4 else 160
    elif gpu_mem_mib < 160 * 1024:
        bs = 256 if tp < 4 else 512
    else:
        bs = 512
    if max_running_requests is not None and bs > max_running_requests:
        bs = max_running_requests
    return bs


def prefill_cuda_graph_sizes(max_bs: int) -> list[int]:
    """Mirrors arg_groups/cuda_graph_hook.py generate_prefill_cuda_graph_batch_sizes."""
    sizes = (
        list(range(4, 33, 4))
        + list(range(48, 257, 16))
        + list(range(288, 513, 32))
        + list(range(576, 1025, 64))
        + list(range(1280, 4097, 256))
        + list(range(4608, max_bs + 1, 512))
    )
    return [s for s in sizes if s <= max_bs]


def auto_mem_fraction_static(
    *,
    gpu_mem_mib: float,
    tp: int,
    pp: int,
    attn_dp: int = 1,
    cuda_graph_max_bs: int | None = None,
    chunked_prefill_size: int | None = None,
    use_mla: bool = False,
    cuda_graph: bool = True,
    vision_layers: int = 0,
    vision_hidden: int = 0,
    prefill_cuda_graph: bool = True,
) -> float:
    """Upstream's mem_fraction_static when it is unset.

    Mirrors arg_groups/memory_hook.py handle_gpu_memory_settings ("Static memory and runtime
    headroom") with reserve_for_graph_mb and adjust_mem_fraction_for_vlm, for a CUDA device,
    no disaggregation, no DeepEP and post-capture KV sizing off (its default):
    reserved_mb = 512 + 1.5 x max(chunked_prefill, 2048) + tp x pp / 8 x 1024 + graph reserve,
    at least 10 GiB above 60 GiB devices; fraction = round((mem - reserved) / mem, 3).
    ``prefill_cuda_graph`` False: upstream disabled prefill graphs
    (cuda_graph_hook.py disable_breakable_cudagraph_if_incompatible, e.g. a served vision
    model), so their reserve is not counted.
    """
    cps = chunked_prefill_size or default_chunked_prefill_size(gpu_mem_mib)
    max_bs = cuda_graph_max_bs or default_cuda_graph_max_bs(gpu_mem_mib, tp)
    reserved = 512 + max(cps, 2048) * 1.5 + tp * pp / 8 * 1024
    if cuda_graph:
        reserved += max_bs * 2
        if attn_dp > 1:
            reserved += max_bs * attn_dp * 3
            if max_bs > 300:
                reserved += max_bs * attn_dp * 1.5
        # Prefill graphs default to the breakable backend on CUDA.
        if not prefill_cuda_graph:
            pass
        elif use_mla:
            reserved += 1.5 * 1024
        else:
            reserved += len(prefill_cuda_graph_sizes(cps)) * 8
    if gpu_mem_mib > 60 * 1024:
        reserved = max(reserved, 10 * 1024)
    fraction = round((gpu_mem_mib - reserved) / gpu_mem_mib, 3)
    if vision_layers:
        # adjust_mem_fraction_for_vlm: shrink by ViT size relative to ViT-L/14.
        ratio = vision_layers * vision_hidden**2 / (24 * 1024**2)
        factor = max(0.8, min(1.05, 1.0 - 0.1 * (ratio - 1.0)))
        fraction *= 0.95 * factor
    return fraction


def kv_budget_bytes(
    *,
    pre_load_bytes: int,
    weight_bytes: int,
    mem_fraction_static: float,
    mm_reservation_bytes: int = 0,
) -> int:
    """KV byte budget; mirrors mem_cache/kv_cache_configurator.py _profile_available_bytes.

    budget = free_after_load - pre_load x (1 - mem_fraction_static) - mm_reservation, with
    free_after_load = pre_load - weights (upstream measures it; the planner subtracts).
    """
    free_after_load = pre_load_bytes - weight_bytes
    slack = pre_load_bytes * (1 - mem_fraction_static)
    rest = free_after_load - slack - mm_reservation_bytes
    if rest <= 0:
        minimum = 1 - free_after_load / pre_load_bytes
        raise PlanError(
            f"weights ({weight_bytes} B per GPU) leave no memory for the KV cache under "
            f"mem_fraction_static={mem_fraction_static}; raise it above "
            f"{math.ceil(minimum * 1000) / 1000:.3f} or use more GPUs"
        )
    return int(rest)


@dataclass(frozen=True)
class PoolSize:
    """Result of sizing the KV pool from a budget."""

    max_total_num_tokens: int  # full-attention (or MHA/MLA) tokens: what one request can use
    swa_tokens: int  # SWA pool tokens (0 when not hybrid)
    pool_bytes: int


def pool_from_budget(
    budget_bytes: int,
    cell: KVPerToken,
    *,
    page_size: int,
    swa_full_tokens_ratio: float = DEFAULT_SWA_FULL_TOKENS_RATIO,
    max_total_tokens: int | None = None,
) -> PoolSize:
    """Tokens a budget holds.

    Mirrors mem_cache/kv_cache_configurator.py config_from_budget with
    model_executor/pool_configurator.py DefaultPoolConfigurator.calculate_pool_sizes
    (budget // cell, page-floored) or HybridSWAPoolConfigurator.calculate_pool_sizes /
    _solve_pool_sizes (full = page-floor(budget // cell), swa = page-floor(full x ratio)),
    then _apply_token_constraints (the --max-total-tokens cap).
    """
    tokens = int(budget_bytes // cell.pool_cell) if cell.pool_cell else 0
    if max_total_tokens is not None:
        tokens = min(tokens, max_total_tokens)
    tokens = tokens // page_size * page_size
    if cell.swa_layers and cell.full_layers:
        swa = int(tokens * swa_full_tokens_ratio) // page_size * page_size
        used = tokens * (cell.full_attention + cell.mla) + swa * cell.sliding_window
    elif cell.swa_layers:
        swa = tokens
        used = tokens * cell.sliding_window
    else:
        swa = 0
        used = tokens * (cell.full_attention + cell.mla)
    return PoolSize(max_total_num_tokens=tokens, swa_tokens=swa, pool_bytes=int(used))


def resolve_max_num_reqs(
    token_capacity: int,
    context_len: int,
    *,
    max_running_requests: int | None = None,
    attn_dp: int = 1,
) -> int:
    """Request slots per DP worker; mirrors kv_cache_configurator.py resolve_max_num_reqs.

    Without --max-running-requests: clamp(capacity / context x 512, 2048, 4096), then at most
    capacity // 2. That floor of 2048 is why req_to_token is 2049 rows at long contexts.
    """
    estimated = int(token_capacity / context_len * 512)
    estimated = max(min(estimated, 4096), 2048)
    if max_running_requests is not None:
        return min(max(1, max_running_requests // attn_dp), token_capacity // 2)
    return min(estimated, token_capacity // 2)
