"""Rendering: the planner's report as the CLI prints it (`python -m sglang_kvalloc.plan`)."""

from __future__ import annotations

from typing import Any

from sglang_kvalloc.core.planner.common import GIB
from sglang_kvalloc.core.planner.decision import AUTO_STATIC_MAX_SHARE
from sglang_kvalloc.core.planner.layouts import GPU_VMM_GRANULARITY, Allocation
from sglang_kvalloc.core.planner.plans import Plan


def _gib(n: float) -> str:
    return f"{n / GIB:,.2f} GiB"


def render(result: Plan) -> str:
    """Human-readable report, as the CLI prints it: the setup and KV pool, the context-scaled
    start-up allocations static vs segmented (with their formulas), the segmented KV pool
    against one request of the whole context, the automatic mode's choice, and the notes."""
    lines = [
        *_setup_lines(result),
        *_kv_pool_lines(result),
        "",
        *_allocation_table_lines(result),
        *_allocation_formula_lines(result),
        *_segmented_allocation_lines(result),
        "",
        *_segmented_kv_lines(result),
        "",
        *_auto_lines(result),
        *_note_lines(result),
    ]
    return "\n".join(lines)


def _setup_lines(result: Plan) -> list[str]:
    """What was planned for: the model, the parallel layout and backend, the device, the
    memory fraction and the weights."""
    auto = " (upstream automatic)" if result.mem_fraction_static_auto else " (given)"
    return [
        f"model            {result.model} ({result.architecture}, {result.attention})",
        f"layout           tp={result.tp} pp={result.pp} attn_dp={result.attn_dp} "
        f"(attn_tp={result.attn_tp}), backend={result.attention_backend}, "
        f"page={result.page_size}",
        f"device memory    {_gib(result.device_memory_bytes)} per GPU",
        f"mem_fraction     {result.mem_fraction_static:.3f}" + auto,
        f"weights / GPU    {_gib(result.weight_bytes_per_gpu)}",
    ]


def _kv_pool_lines(result: Plan) -> list[str]:
    """The KV budget, the bytes a token takes, the pool upstream sizes from them, the context
    one request can hold, and upstream's refusal where it would refuse the setup."""
    per_token = result.kv_per_token
    swa = f" (+ {result.swa_tokens:,} SWA-pool tokens)" if result.swa_tokens else ""
    requested = f"{result.requested_context:,}" if result.requested_context else "(model default)"
    lines = [
        f"KV budget / GPU  {result.budget_bytes:,} B ({_gib(result.budget_bytes)}); "
        f"runtime slack {_gib(result.slack_bytes)}",
        f"KV dtype         {result.kv_cache_dtype} ({result.kv_bytes_per_element} B/elem)",
        "KV B/token/GPU   "
        f"full-attn {per_token.full_attention:,} ({per_token.full_layers} layers) | "
        f"sliding/chunked {per_token.sliding_window:,} ({per_token.swa_layers} layers) | "
        f"MLA {per_token.mla:,}",
        f"pool             {result.max_total_num_tokens:,} tokens{swa}, {_gib(result.pool_bytes)}",
        f"context          requested {requested}, model max {result.model_max_context:,}, "
        f"one request can hold {result.max_context_one_request:,}",
    ]
    if result.upstream_refusal:
        lines.append(f"NOTE             {result.upstream_refusal}")
    return lines


def _lazy_figures(result: Plan) -> dict[str, dict[str, Any]]:
    """Segmented mode's lazy cuda-graph buffers by name."""
    return {f["name"]: f for f in result.segmented.lazy_graph_buffers}


def _allocation_table_lines(result: Plan) -> list[str]:
    """The table of context-scaled start-up allocations, static vs segmented: one row per
    allocation, then the totals, the request slots and whether each fits in the slack."""
    header = f"{'context-scaled start-up allocation':<40} {'static':>18} {'segmented':>18}"
    lazy = _lazy_figures(result)
    static, segmented = result.static, result.segmented
    rows = [
        f"{a.name:<40} {a.bytes:>18,} {_segmented_cell(result, a, lazy):>18}"
        for a in static.allocations
    ]
    slots = f"{static.max_num_reqs} / {static.cuda_graph_max_bs}"
    segmented_slots = f"{segmented.max_num_reqs} / {segmented.cuda_graph_max_bs}"
    return [
        f"at context {result.planned_context:,}",
        header,
        "-" * len(header),
        *rows,
        f"{'committed (segmented: worst case)':<40} "
        f"{static.context_scaled_committed_bytes:>18,} "
        f"{segmented.context_scaled_committed_bytes:>18,}",
        f"{'reserved (virtual)':<40} {static.context_scaled_reserved_bytes:>18,} "
        f"{segmented.context_scaled_reserved_bytes:>18,}",
        f"{'request slots / captured bs':<40} {slots:>18} {segmented_slots:>18}",
        f"{'fits in runtime slack':<40} {str(static.fits_in_slack):>18} "
        f"{str(segmented.fits_in_slack):>18}",
    ]


def _segmented_cell(result: Plan, allocation: Allocation, lazy: dict[str, dict[str, Any]]) -> str:
    """An allocation's segmented column: what a lazy buffer commits at capture, the bound on
    req_to_token's committed rows, or upstream's size (marked *) where it is not lazy."""
    if allocation.name in lazy:
        return f"{lazy[allocation.name]['capture_commit_bytes']:,}"
    if allocation.name != "req_to_token":
        return f"{allocation.bytes:,} *"  # not lazy yet: allocated at upstream's size
    if result.segmented_kv.row_room is not None:
        return f"<= {result.segmented_kv.row_room.committed_at_most:,}"
    return "as written"


def _allocation_formula_lines(result: Plan) -> list[str]:
    """Each allocation's formula and the upstream code it mirrors."""
    return [f"  {a.name}: {a.formula}  [{a.upstream}]" for a in result.static.allocations]


def _segmented_allocation_lines(result: Plan) -> list[str]:
    """How segmented mode commits its allocations: req_to_token's rows, each lazy buffer's
    commits, and the footnote for the * rows (allocated at upstream's size)."""
    lines = []
    room = result.segmented_kv.row_room
    if room is not None:
        lines.append(
            f"  segmented req_to_token: reserved; rows committed as used, in "
            f"{GPU_VMM_GRANULARITY >> 20} MiB granules: at most one per request slot plus "
            f"4 B a token, never more than the table; the KV budget keeps "
            f"{room.in_kv_budget:,} B of it free (the rest from the slack, as static's table): "
            f"segmented pool {result.segmented_kv.max_total_num_tokens:,} tokens, static "
            f"{result.max_total_num_tokens:,}"
        )
    for buffer in result.segmented.lazy_graph_buffers:
        lines.append(
            f"  segmented {buffer['name']}: reserved; committed before each graph replay as far as "
            f"the batch writes: {buffer['capture_commit_bytes']:,} B at capture, "
            f"{buffer['one_full_context_request_commit_bytes']:,} B for one request of the whole "
            "context; given back at idle"
        )
    lazy = _lazy_figures(result)
    if any(a.name != "req_to_token" and a.name not in lazy for a in result.static.allocations):
        lines.append(
            "  * allocated at upstream's size in segmented mode too (not lazy in this build)"
        )
    return lines


def _segmented_kv_lines(result: Plan) -> list[str]:
    """Segmented mode's KV pool: what it reserves and commits at start, what one request of
    the whole context commits, whether it fits, and the flags under which upstream's sizing
    would hold it."""
    kv = result.segmented_kv
    fits = kv.request_fits_pool and kv.headroom_bytes >= 0
    swa = f" + {kv.request_swa_tokens:,} sliding-window" if kv.request_swa_tokens else ""
    return [
        f"segmented KV pool ({kv.pool_kind}): reserved {kv.reserved_bytes:,} B (upstream's "
        f"size); committed at start {kv.committed_at_start_bytes:,} B (one segment of "
        f"{kv.segment_tokens:,} tokens per pool)",
        f"one request of {kv.request_context:,} tokens commits {kv.request_kv_bytes:,} B of KV "
        f"({kv.request_full_tokens:,} full-attention{swa} token slots)",
        f"  reserved pool holds it: {kv.request_fits_pool}; device headroom after weights, this "
        f"KV and segmented's committed tables: {kv.headroom_bytes:,} B -> fits: {fits}",
        *_upstream_sizing_hint_lines(result),
    ]


def _upstream_sizing_hint_lines(result: Plan) -> list[str]:
    """Where the request fits the device but not the reserved pool: the flags (SWA ratio,
    memory fraction) under which upstream's sizing holds it; else nothing."""
    kv = result.segmented_kv
    if kv.request_fits_pool or kv.headroom_bytes < 0:
        return []
    hint = []
    if kv.swa_full_tokens_ratio_for_request is not None:
        hint.append(f"--swa-full-tokens-ratio {kv.swa_full_tokens_ratio_for_request}")
    needed = kv.mem_fraction_static_for_request
    if needed is not None and needed > result.mem_fraction_static:
        hint.append(f"--mem-fraction-static >= {kv.mem_fraction_static_for_request}")
    return ["  upstream's sizing holds it (one such request at a time) with " + " and ".join(hint)]


def _auto_lines(result: Plan) -> list[str]:
    """The automatic mode's choice, its context, its reason and the threshold it applies."""
    clamped = " (clamped)" if result.auto.clamped else ""
    return [
        f"auto -> {result.auto.mode}, context {result.auto.effective_context:,}{clamped}",
        f"  {result.auto.reason}",
        f"  threshold AUTO_STATIC_MAX_SHARE = {AUTO_STATIC_MAX_SHARE:.0%} of the KV budget",
    ]


def _note_lines(result: Plan) -> list[str]:
    """The planner's notes, and that its figures are computed, not measured."""
    return [
        *(f"note: {n}" for n in result.notes),
        "Figures are computed by the planner, not measured on GPUs.",
    ]
