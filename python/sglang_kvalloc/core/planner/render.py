"""Rendering: the planner's report as the CLI prints it (`python -m sglang_kvalloc.plan`)."""

from __future__ import annotations

from sglang_kvalloc.core.planner.common import GIB
from sglang_kvalloc.core.planner.decision import AUTO_STATIC_MAX_SHARE
from sglang_kvalloc.core.planner.layouts import GPU_VMM_GRANULARITY
from sglang_kvalloc.core.planner.plans import Plan


def _gib(n: float) -> str:
    return f"{n / GIB:,.2f} GiB"


def render(result: Plan) -> str:
    """Human-readable report."""
    c = result.kv_per_token
    lines = [
        f"model            {result.model} ({result.architecture}, {result.attention})",
        f"layout           tp={result.tp} pp={result.pp} attn_dp={result.attn_dp} "
        f"(attn_tp={result.attn_tp}), backend={result.attention_backend}, "
        f"page={result.page_size}",
        f"device memory    {_gib(result.device_memory_bytes)} per GPU",
        f"mem_fraction     {result.mem_fraction_static:.3f}"
        + (" (upstream automatic)" if result.mem_fraction_static_auto else " (given)"),
        f"weights / GPU    {_gib(result.weight_bytes_per_gpu)}",
        f"KV budget / GPU  {result.budget_bytes:,} B ({_gib(result.budget_bytes)}); "
        f"runtime slack {_gib(result.slack_bytes)}",
        f"KV dtype         {result.kv_cache_dtype} ({result.kv_bytes_per_element} B/elem)",
        "KV B/token/GPU   "
        f"full-attn {c.full_attention:,} ({c.full_layers} layers) | "
        f"sliding/chunked {c.sliding_window:,} ({c.swa_layers} layers) | MLA {c.mla:,}",
        f"pool             {result.max_total_num_tokens:,} tokens"
        + (f" (+ {result.swa_tokens:,} SWA-pool tokens)" if result.swa_tokens else "")
        + f", {_gib(result.pool_bytes)}",
        "context          requested "
        + (f"{result.requested_context:,}" if result.requested_context else "(model default)")
        + ", "
        f"model max {result.model_max_context:,}, one request can hold "
        f"{result.max_context_one_request:,}",
    ]
    if result.upstream_refusal:
        lines.append(f"NOTE             {result.upstream_refusal}")
    lines.append("")
    header = f"{'context-scaled start-up allocation':<40} {'static':>18} {'segmented':>18}"
    lines += [f"at context {result.planned_context:,}", header, "-" * len(header)]
    lazy = {f["name"]: f for f in result.segmented.lazy_graph_buffers}
    for a in result.static.allocations:
        if a.name in lazy:
            segmented = f"{lazy[a.name]['capture_commit_bytes']:,}"
        elif a.name != "req_to_token":
            segmented = f"{a.bytes:,} *"  # not lazy yet: allocated at upstream's size
        elif result.segmented_kv.row_room is not None:
            segmented = f"<= {result.segmented_kv.row_room.committed_at_most:,}"
        else:
            segmented = "as written"
        lines.append(f"{a.name:<40} {a.bytes:>18,} {segmented:>18}")
    lines.append(
        f"{'committed (segmented: worst case)':<40} "
        f"{result.static.context_scaled_committed_bytes:>18,} "
        f"{result.segmented.context_scaled_committed_bytes:>18,}"
    )
    lines.append(
        f"{'reserved (virtual)':<40} {result.static.context_scaled_reserved_bytes:>18,} "
        f"{result.segmented.context_scaled_reserved_bytes:>18,}"
    )
    lines.append(
        f"{'request slots / captured bs':<40} "
        f"{f'{result.static.max_num_reqs} / {result.static.cuda_graph_max_bs}':>18} "
        f"{f'{result.segmented.max_num_reqs} / {result.segmented.cuda_graph_max_bs}':>18}"
    )
    lines.append(
        f"{'fits in runtime slack':<40} {str(result.static.fits_in_slack):>18} "
        f"{str(result.segmented.fits_in_slack):>18}"
    )
    for a in result.static.allocations:
        lines.append(f"  {a.name}: {a.formula}  [{a.upstream}]")
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
    for f in result.segmented.lazy_graph_buffers:
        lines.append(
            f"  segmented {f['name']}: reserved; committed before each graph replay as far as "
            f"the batch writes: {f['capture_commit_bytes']:,} B at capture, "
            f"{f['one_full_context_request_commit_bytes']:,} B for one request of the whole "
            "context; given back at idle"
        )
    if any(a.name != "req_to_token" and a.name not in lazy for a in result.static.allocations):
        lines.append(
            "  * allocated at upstream's size in segmented mode too (not lazy in this build)"
        )
    kv = result.segmented_kv
    fits = kv.request_fits_pool and kv.headroom_bytes >= 0
    lines += [
        "",
        f"segmented KV pool ({kv.pool_kind}): reserved {kv.reserved_bytes:,} B (upstream's "
        f"size); committed at start {kv.committed_at_start_bytes:,} B (one segment of "
        f"{kv.segment_tokens:,} tokens per pool)",
        f"one request of {kv.request_context:,} tokens commits {kv.request_kv_bytes:,} B of KV "
        f"({kv.request_full_tokens:,} full-attention"
        + (f" + {kv.request_swa_tokens:,} sliding-window" if kv.request_swa_tokens else "")
        + " token slots)",
        f"  reserved pool holds it: {kv.request_fits_pool}; device headroom after weights, this "
        f"KV and segmented's committed tables: {kv.headroom_bytes:,} B -> fits: {fits}",
    ]
    if not kv.request_fits_pool and kv.headroom_bytes >= 0:
        hint = []
        if kv.swa_full_tokens_ratio_for_request is not None:
            hint.append(f"--swa-full-tokens-ratio {kv.swa_full_tokens_ratio_for_request}")
        needed = kv.mem_fraction_static_for_request
        if needed is not None and needed > result.mem_fraction_static:
            hint.append(f"--mem-fraction-static >= {kv.mem_fraction_static_for_request}")
        lines.append(
            "  upstream's sizing holds it (one such request at a time) with " + " and ".join(hint)
        )
    lines += [
        "",
        f"auto -> {result.auto.mode}, context {result.auto.effective_context:,}"
        + (" (clamped)" if result.auto.clamped else ""),
        f"  {result.auto.reason}",
        f"  threshold AUTO_STATIC_MAX_SHARE = {AUTO_STATIC_MAX_SHARE:.0%} of the KV budget",
    ]
    lines += [f"note: {n}" for n in result.notes]
    lines.append("Figures are computed by the planner, not measured on GPUs.")
    return "\n".join(lines)
