"""The whole plan: the inputs, the static and segmented start-up plans, segmented mode's KV
pool and the auto decision, in the order of upstream's `_resolve_memory_pool_config`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sglang_kvalloc.core.planner.budget import (
    DEFAULT_PRE_LOAD_OVERHEAD_BYTES,
    VLM_CACHE_SIZE_MB,
    PoolSize,
    RowRoom,
    auto_mem_fraction_static,
    default_chunked_prefill_size,
    default_cuda_graph_max_bs,
    kv_budget_bytes,
    pool_from_budget,
    req_to_token_room,
    resolve_max_num_reqs,
)
from sglang_kvalloc.core.planner.common import MIB, PlanError
from sglang_kvalloc.core.planner.decision import AutoDecision, decide_auto
from sglang_kvalloc.core.planner.layouts import (
    ATTENTION_BACKENDS,
    GPU_VMM_GRANULARITY,
    Allocation,
    cuda_graph_allocations,
    lazy_graph_buffer_figures,
    req_to_token_allocation,
    req_to_token_extra,
    segmented_committed_bytes,
)
from sglang_kvalloc.core.planner.model import (
    DEFAULT_SWA_FULL_TOKENS_RATIO,
    LLAMA4_ARCHS,
    KVPerToken,
    ModelSpec,
    check_parallel,
    estimate_weight_bytes_per_gpu,
    keeps_prefill_cuda_graphs,
    kv_dtype_bytes,
    kv_per_token,
    load_model_config,
    model_spec_from_config,
    pp_layer_range,
    serves_multimodal,
)
from sglang_kvalloc.core.planner.segmented_kv import SegmentedKv, segmented_kv

# models/llama4.py and arg_groups/model_hook.py accept only these backends for Llama-4 on GPU.
LLAMA4_BACKENDS: frozenset[str] = frozenset({"fa3", "triton"})


@dataclass(frozen=True)
class PlanInputs:
    """Everything a plan depends on. None means "upstream's default"."""

    model: Mapping[str, Any] | str | Path
    device_memory_bytes: int
    tp: int = 1
    pp: int = 1
    attn_dp: int = 1
    mem_fraction_static: float | None = None
    kv_cache_dtype: str = "auto"
    page_size: int = 1
    max_running_requests: int | None = None
    cuda_graph_max_bs: int | None = None
    disable_cuda_graph: bool = False
    attention_backend: str = "fa3"
    speculative_draft_tokens: int = 0
    speculative_eagle_topk: int = 1
    speculative_num_steps: int = 0
    context_length: int | None = None
    allow_longer_context: bool = False
    max_total_tokens: int | None = None
    swa_full_tokens_ratio: float = DEFAULT_SWA_FULL_TOKENS_RATIO
    weight_bytes_per_gpu: int | None = None
    pre_load_overhead_bytes: int = DEFAULT_PRE_LOAD_OVERHEAD_BYTES
    chunked_prefill_size: int | None = None
    enable_multimodal: bool | None = None  # --enable-multimodal; None: upstream's default


@dataclass(frozen=True)
class ModePlan:
    """Start-up cost of one mode at the planned context."""

    mode: str
    context_len: int
    max_num_reqs: int
    cuda_graph_max_bs: int
    allocations: list[Allocation]
    context_scaled_reserved_bytes: int
    context_scaled_committed_bytes: int
    fits_in_slack: bool
    # Segmented on a GPU: per lazy cuda-graph buffer, reserved bytes and what capture and one
    # request of the whole context commit (`lazy_graph_buffer_figures`).
    lazy_graph_buffers: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Plan:
    """Planner output for one configuration."""

    model: str
    architecture: str
    attention: str
    kv_cache_dtype: str
    kv_bytes_per_element: int
    tp: int
    pp: int
    attn_dp: int
    attn_tp: int
    page_size: int
    attention_backend: str
    device_memory_bytes: int
    mem_fraction_static: float
    mem_fraction_static_auto: bool
    pre_load_bytes: int
    weight_bytes_per_gpu: int
    slack_bytes: int
    budget_bytes: int
    kv_per_token: KVPerToken
    max_total_num_tokens: int
    swa_tokens: int
    pool_bytes: int
    model_max_context: int
    requested_context: int | None
    planned_context: int
    max_context_one_request: int
    upstream_refusal: str | None
    static: ModePlan
    segmented: ModePlan
    segmented_kv: SegmentedKv
    auto: AutoDecision
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def _validate(inputs: PlanInputs) -> None:
    if inputs.device_memory_bytes <= 0:
        raise PlanError(f"device memory must be positive (got {inputs.device_memory_bytes} B)")
    if inputs.page_size < 1:
        raise PlanError(f"page size must be >= 1 (got {inputs.page_size})")
    if inputs.context_length is not None and inputs.context_length <= 0:
        raise PlanError(f"context length must be positive (got {inputs.context_length})")
    if inputs.mem_fraction_static is not None and not 0 < inputs.mem_fraction_static <= 1:
        raise PlanError(f"mem_fraction_static must be in (0, 1] (got {inputs.mem_fraction_static})")
    if inputs.attention_backend not in ATTENTION_BACKENDS:
        raise PlanError(
            f"unknown attention backend {inputs.attention_backend!r} "
            f"(choose from {', '.join(ATTENTION_BACKENDS)})"
        )
    if inputs.speculative_draft_tokens < 0:
        raise PlanError(f"draft tokens must be >= 0 (got {inputs.speculative_draft_tokens})")
    if inputs.speculative_num_steps < 0:
        raise PlanError(f"draft steps must be >= 0 (got {inputs.speculative_num_steps})")
    if inputs.speculative_eagle_topk < 1:
        raise PlanError(f"EAGLE top-k must be >= 1 (got {inputs.speculative_eagle_topk})")
    if inputs.max_running_requests is not None and inputs.max_running_requests < 1:
        raise PlanError(f"max running requests must be >= 1 (got {inputs.max_running_requests})")
    if inputs.cuda_graph_max_bs is not None and inputs.cuda_graph_max_bs < 1:
        raise PlanError(f"cuda-graph max bs must be >= 1 (got {inputs.cuda_graph_max_bs})")
    if not 0 < inputs.swa_full_tokens_ratio <= 1:
        raise PlanError(
            f"swa_full_tokens_ratio must be in (0, 1] (got {inputs.swa_full_tokens_ratio})"
        )
    if inputs.max_total_tokens is not None and inputs.max_total_tokens <= 0:
        raise PlanError(f"max total tokens must be positive (got {inputs.max_total_tokens})")
    if inputs.pre_load_overhead_bytes < 0:
        raise PlanError("pre-load overhead must be >= 0")


@dataclass(frozen=True)
class _Pool:
    """The pool of the stage that holds the fewest tokens, with what sized it."""

    size: PoolSize
    cell: KVPerToken
    budget_bytes: int
    weight_bytes: int


def plan(inputs: PlanInputs) -> Plan:
    """Compute the static and segmented start-up plans and the auto decision.

    Follows mem_cache/kv_cache_configurator.py _resolve_memory_pool_config: budget
    (_profile_available_bytes) -> pool (config_from_budget, min over PP stages as
    _apply_token_constraints' all-reduce) -> request slots (resolve_max_num_reqs) ->
    req_to_token (_build_req_to_token_pool) -> cuda-graph buffers (backend
    init_cuda_graph_state).
    """
    _validate(inputs)
    spec = model_spec_from_config(load_model_config(inputs.model))
    attn_tp = check_parallel(spec, inputs.tp, inputs.pp, inputs.attn_dp)
    if spec.architecture in LLAMA4_ARCHS and inputs.attention_backend not in LLAMA4_BACKENDS:
        # arg_groups/model_hook.py asserts this for Llama-4 on GPU.
        raise PlanError(
            f"upstream requires fa3 or triton (of this planner's backends) for Llama-4, "
            f"got {inputs.attention_backend}"
        )
    kv_bytes = kv_dtype_bytes(inputs.kv_cache_dtype, spec.dtype_bytes)
    gpu_mem_mib = inputs.device_memory_bytes / MIB
    requested, planned, refusal = _context(inputs, spec)
    graph_bs = inputs.cuda_graph_max_bs or default_cuda_graph_max_bs(
        gpu_mem_mib, inputs.tp, inputs.max_running_requests
    )
    mfs = _mem_fraction_static(inputs, spec, gpu_mem_mib, graph_bs)
    pre_load = inputs.device_memory_bytes - inputs.pre_load_overhead_bytes
    if pre_load <= 0:
        raise PlanError(
            f"device memory {inputs.device_memory_bytes} B does not exceed the pre-load "
            f"overhead {inputs.pre_load_overhead_bytes} B"
        )
    multimodal = serves_multimodal(spec, inputs.enable_multimodal)
    mm_reservation = VLM_CACHE_SIZE_MB * MIB if multimodal else 0
    pool = _smallest_stage_pool(inputs, spec, attn_tp, kv_bytes, pre_load, mfs, mm_reservation)
    one_request = pool.size.max_total_num_tokens // inputs.page_size * inputs.page_size
    if not inputs.allow_longer_context:
        one_request = min(one_request, spec.model_max_context)
    slack = int(pre_load * (1 - mfs))
    static = _mode_plan("static", inputs, spec, pool.size, planned, graph_bs, slack)
    segmented = _mode_plan("segmented", inputs, spec, pool.size, planned, graph_bs, slack)
    kv_plan = segmented_kv(
        spec,
        pool.cell,
        pool.size,
        context_len=planned,
        page_size=inputs.page_size,
        chunked_prefill_size=inputs.chunked_prefill_size
        or default_chunked_prefill_size(gpu_mem_mib),
        pre_load_bytes=pre_load,
        weight_bytes=pool.weight_bytes,
        mm_reservation_bytes=mm_reservation,
        segmented_committed_bytes=segmented.context_scaled_committed_bytes,
    )
    row_room = None
    if inputs.attention_backend != "torch_native":
        row_room, seg_tokens = _segmented_pool(inputs, pool, planned)
        kv_plan = replace(kv_plan, row_room=row_room, max_total_num_tokens=seg_tokens)
    else:
        kv_plan = replace(kv_plan, max_total_num_tokens=pool.size.max_total_num_tokens)
    decision = decide_auto(
        requested_context=requested,
        model_max_context=spec.model_max_context,
        max_context_one_request=one_request,
        context_scaled_bytes_static=static.context_scaled_reserved_bytes,
        budget_bytes=pool.size.pool_bytes,  # what the pool takes (the server compares the same)
    )
    if decision.mode == "segmented" and row_room is not None:
        decision = _context_within_segmented_pool(inputs, pool, decision)
    return Plan(
        model=spec.name,
        architecture=spec.architecture,
        attention=spec.attention,
        kv_cache_dtype=inputs.kv_cache_dtype,
        kv_bytes_per_element=kv_bytes,
        tp=inputs.tp,
        pp=inputs.pp,
        attn_dp=inputs.attn_dp,
        attn_tp=attn_tp,
        page_size=inputs.page_size,
        attention_backend=inputs.attention_backend,
        device_memory_bytes=inputs.device_memory_bytes,
        mem_fraction_static=mfs,
        mem_fraction_static_auto=inputs.mem_fraction_static is None,
        pre_load_bytes=pre_load,
        weight_bytes_per_gpu=pool.weight_bytes,
        slack_bytes=slack,
        budget_bytes=pool.budget_bytes,
        kv_per_token=pool.cell,
        max_total_num_tokens=pool.size.max_total_num_tokens,
        swa_tokens=pool.size.swa_tokens,
        pool_bytes=pool.size.pool_bytes,
        model_max_context=spec.model_max_context,
        requested_context=requested,
        planned_context=planned,
        max_context_one_request=one_request,
        upstream_refusal=refusal,
        static=static,
        segmented=segmented,
        segmented_kv=kv_plan,
        auto=decision,
        notes=_notes(inputs),
    )


def _segmented_pool(inputs: PlanInputs, pool: _Pool, context_len: int) -> tuple[RowRoom, int]:
    """Segmented on a GPU at ``context_len``: req_to_token's run-time room and the tokens the
    pool holds once the KV budget keeps its share free (`pools._settle_run_time_memory`)."""
    reqs = resolve_max_num_reqs(
        pool.size.max_total_num_tokens,
        context_len,
        max_running_requests=inputs.max_running_requests,
        attn_dp=inputs.attn_dp,
    )
    extra = req_to_token_extra(inputs.speculative_draft_tokens)
    room = req_to_token_room(
        max_running_requests=reqs,
        token_capacity=pool.size.max_total_num_tokens,
        table_bytes=req_to_token_allocation(reqs, context_len, extra).bytes,
        granularity=GPU_VMM_GRANULARITY,
        kv_pool_bytes=pool.size.pool_bytes,
    )
    settled = pool_from_budget(
        pool.budget_bytes - room.in_kv_budget,
        pool.cell,
        page_size=inputs.page_size,
        swa_full_tokens_ratio=inputs.swa_full_tokens_ratio,
        max_total_tokens=inputs.max_total_tokens,
    )
    return room, settled.max_total_num_tokens


def _context_within_segmented_pool(
    inputs: PlanInputs, pool: _Pool, decision: AutoDecision
) -> AutoDecision:
    """auto chose segmented: the server keeps the room after the clamp, then the context
    follows the pool it ends with (`pools._context_within_pool`)."""
    _, tokens = _segmented_pool(inputs, pool, decision.effective_context)
    capacity = tokens // inputs.page_size * inputs.page_size
    if capacity >= decision.effective_context:
        return decision
    return replace(
        decision,
        effective_context=capacity,
        clamped=True,
        reason=f"{decision.reason}; context then clamped to {capacity}: the pool once "
        "req_to_token's run-time room is kept free",
    )


def _context(inputs: PlanInputs, spec: ModelSpec) -> tuple[int | None, int, str | None]:
    """The context asked for, the one upstream would run with (configs/model_config.py
    _derive_context_length) and, past the model's maximum, upstream's refusal."""
    requested = inputs.context_length
    planned = spec.model_max_context if requested is None else requested
    refusal = None
    if requested is not None and requested > spec.model_max_context:
        if not inputs.allow_longer_context:
            refusal = (
                f"upstream refuses context_length {requested} > derived {spec.model_max_context} "
                "unless SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1"
            )
    return requested, planned, refusal


def _mem_fraction_static(
    inputs: PlanInputs, spec: ModelSpec, gpu_mem_mib: float, graph_bs: int
) -> float:
    """The one given, else upstream's automatic one."""
    if inputs.mem_fraction_static is not None:
        return float(inputs.mem_fraction_static)
    multimodal = serves_multimodal(spec, inputs.enable_multimodal)
    return auto_mem_fraction_static(
        gpu_mem_mib=gpu_mem_mib,
        tp=inputs.tp,
        pp=inputs.pp,
        attn_dp=inputs.attn_dp,
        cuda_graph_max_bs=graph_bs,
        chunked_prefill_size=inputs.chunked_prefill_size,
        use_mla=spec.attention == "mla",
        cuda_graph=not inputs.disable_cuda_graph,
        vision_layers=spec.vision_layers if multimodal else 0,
        vision_hidden=spec.vision_hidden,
        prefill_cuda_graph=keeps_prefill_cuda_graphs(spec, inputs.enable_multimodal),
    )


def _smallest_stage_pool(
    inputs: PlanInputs,
    spec: ModelSpec,
    attn_tp: int,
    kv_bytes: int,
    pre_load: int,
    mfs: float,
    mm_reservation: int,
) -> _Pool:
    """One pool size per PP stage; upstream all-reduces the MIN across stages. PlanError
    where it cannot hold one page, or (hybrid SWA) one request's window."""
    best: _Pool | None = None
    for rank in range(inputs.pp):
        layer_range = pp_layer_range(spec.num_layers, rank, inputs.pp)
        weights = inputs.weight_bytes_per_gpu
        if weights is None:
            weights = estimate_weight_bytes_per_gpu(
                spec, tp=inputs.tp, attn_tp=attn_tp, layer_range=layer_range
            )
        budget = kv_budget_bytes(
            pre_load_bytes=pre_load,
            weight_bytes=weights,
            mem_fraction_static=mfs,
            mm_reservation_bytes=mm_reservation,
        )
        cell = kv_per_token(
            spec,
            attn_tp=attn_tp,
            kv_bytes=kv_bytes,
            layer_range=layer_range,
            swa_full_tokens_ratio=inputs.swa_full_tokens_ratio,
        )
        size = pool_from_budget(
            budget,
            cell,
            page_size=inputs.page_size,
            swa_full_tokens_ratio=inputs.swa_full_tokens_ratio,
            max_total_tokens=inputs.max_total_tokens,
        )
        if best is None or size.max_total_num_tokens < best.size.max_total_num_tokens:
            best = _Pool(size, cell, budget, weights)
    assert best is not None
    size, cell, budget = best.size, best.cell, best.budget_bytes
    if size.max_total_num_tokens < inputs.page_size:
        raise PlanError(
            f"KV budget of {budget} B per GPU holds {int(budget // max(cell.pool_cell, 1))} "
            f"tokens at {cell.pool_cell:g} B/token; one page of {inputs.page_size} tokens needs "
            f"{math.ceil(cell.pool_cell * inputs.page_size)} B"
        )
    if spec.is_hybrid_swa and cell.full_layers and spec.sliding_window:
        # pool_configurator.py MemoryPoolConfigurator.validate_swa_pool_size
        if spec.sliding_window + inputs.page_size >= size.swa_tokens:
            raise PlanError(
                f"SWA pool ({size.swa_tokens} tokens) cannot hold one request: it needs more "
                f"than sliding window {spec.sliding_window} + page {inputs.page_size}"
            )
    return best


def _mode_plan(
    mode: str,
    inputs: PlanInputs,
    spec: ModelSpec,
    pool: PoolSize,
    context_len: int,
    graph_bs: int,
    slack: int,
) -> ModePlan:
    """One mode's start-up cost at ``context_len``: request slots, the context-sized
    allocations, what is reserved and what is committed."""
    backend = inputs.attention_backend
    reqs = resolve_max_num_reqs(
        pool.max_total_num_tokens,
        context_len,
        max_running_requests=inputs.max_running_requests,
        attn_dp=inputs.attn_dp,
    )
    captured_bs = 0 if inputs.disable_cuda_graph else min(graph_bs, reqs)
    allocs = [
        req_to_token_allocation(
            reqs, context_len, req_to_token_extra(inputs.speculative_draft_tokens)
        )
    ]
    allocs += cuda_graph_allocations(
        spec,
        backend=backend,
        max_bs=captured_bs,
        context_len=context_len,
        page_size=inputs.page_size,
        speculative_draft_tokens=inputs.speculative_draft_tokens,
        speculative_topk=inputs.speculative_eagle_topk,
        speculative_num_steps=inputs.speculative_num_steps,
    )
    reserved = sum(a.bytes for a in allocs)
    if mode == "static":
        committed = reserved
    else:
        committed = segmented_committed_bytes(
            allocs,
            reqs,
            on_gpu=backend != "torch_native",
            captured_bs=captured_bs,
            tokens_per_row=inputs.speculative_draft_tokens,
        )
    lazy: list[dict[str, Any]] = []
    if mode == "segmented" and backend != "torch_native":
        lazy = lazy_graph_buffer_figures(
            allocs, captured_bs, context_len, inputs.speculative_draft_tokens
        )
    return ModePlan(
        mode=mode,
        context_len=context_len,
        max_num_reqs=reqs,
        cuda_graph_max_bs=captured_bs,
        allocations=allocs,
        context_scaled_reserved_bytes=reserved,
        context_scaled_committed_bytes=committed,
        fits_in_slack=committed <= slack,
        lazy_graph_buffers=lazy,
    )


def _notes(inputs: PlanInputs) -> list[str]:
    """What the plan assumes that the inputs did not say."""
    notes: list[str] = []
    if inputs.weight_bytes_per_gpu is None:
        notes.append("weight bytes per GPU are estimated from the parameter count (bf16/fp16)")
    notes.append(
        f"pre-load free memory assumed = device memory - {inputs.pre_load_overhead_bytes} B"
    )
    if inputs.speculative_draft_tokens:
        notes.append(
            "the draft model's own KV pool is not included"
            + (
                "; its cuda-graph buffers are (draft steps given)"
                if inputs.speculative_num_steps > 1
                else ", nor its cuda-graph buffers (give --speculative-num-steps)"
            )
        )
    return notes
