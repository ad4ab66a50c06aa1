"""Capacity-planner CLI: ``python -m sglang_kvalloc.plan``.

Prints, for one model and device layout, the KV pool upstream SGLang 0.5.23 would size, every
start-up allocation that grows with the context, static vs segmented, and what ``auto``
picks. Pure computation: no GPU, no server. Bad input exits with status 2 (argparse style).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from sglang_kvalloc.core.planner import (
    ATTENTION_BACKENDS,
    AUTO_STATIC_MAX_SHARE,
    DEFAULT_PRE_LOAD_OVERHEAD_BYTES,
    DEFAULT_SWA_FULL_TOKENS_RATIO,
    GIB,
    GPU_PRESETS_MIB,
    GPU_VMM_GRANULARITY,
    KV_CACHE_DTYPES,
    MIB,
    Plan,
    PlanError,
    PlanInputs,
    builtin_model_names,
    plan,
)


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m sglang_kvalloc.plan",
        description=(
            "Plan KV capacity and context-scaled start-up allocations for SGLang 0.5.23, "
            "static vs segmented. Computed, not measured."
        ),
    )
    p.add_argument(
        "--model-config",
        required=True,
        help=f"config.json path, model directory, or one of: {', '.join(builtin_model_names())}",
    )
    dev = p.add_mutually_exclusive_group(required=True)
    dev.add_argument("--gpu", choices=sorted(GPU_PRESETS_MIB), help="device preset")
    dev.add_argument("--gpu-mem-gb", type=float, help="device memory per GPU in GiB (2^30 B)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument(
        "--attention-dp", "--dp-size", dest="attn_dp", type=int, default=1,
        help="attention data-parallel size (--enable-dp-attention --dp-size N)",
    )  # fmt: skip
    p.add_argument("--mem-fraction-static", type=float, default=None, help="default: upstream's")
    p.add_argument(
        "--kv-cache-dtype", choices=list(KV_CACHE_DTYPES), default="auto", metavar="DTYPE",
        help=f"one of {', '.join(KV_CACHE_DTYPES)} (default auto = model dtype)",
    )  # fmt: skip
    p.add_argument("--page-size", type=int, default=1)
    p.add_argument("--max-running-requests", type=int, default=None)
    p.add_argument("--cuda-graph-max-bs", type=int, default=None)
    p.add_argument("--disable-cuda-graph", action="store_true")
    p.add_argument("--attention-backend", choices=list(ATTENTION_BACKENDS), default="fa3")
    p.add_argument("--speculative-num-draft-tokens", type=int, default=0)
    p.add_argument("--speculative-eagle-topk", type=int, default=1)
    p.add_argument("--speculative-num-steps", type=int, default=0)
    p.add_argument("--context-length", type=int, default=None, help="default: the model's")
    p.add_argument(
        "--allow-longer-context",
        action="store_true",
        help="as SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1: do not bound by the model maximum",
    )
    p.add_argument("--max-total-tokens", type=int, default=None)
    p.add_argument("--swa-full-tokens-ratio", type=float, default=DEFAULT_SWA_FULL_TOKENS_RATIO)
    p.add_argument("--chunked-prefill-size", type=int, default=None)
    p.add_argument(
        "--weights-gb", type=float, default=None,
        help="weight GiB per GPU (default: estimated from the parameter count)",
    )  # fmt: skip
    p.add_argument(
        "--pre-load-overhead-gb", type=float, default=DEFAULT_PRE_LOAD_OVERHEAD_BYTES / GIB,
        help="GiB in use before weights load (CUDA context, NCCL); default %(default)s",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return p


def inputs_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> PlanInputs:
    """Turn parsed arguments into PlanInputs, rejecting bad values through parser.error."""
    if args.gpu is not None:
        device_bytes = GPU_PRESETS_MIB[args.gpu] * MIB
    else:
        if args.gpu_mem_gb <= 0:
            parser.error(f"--gpu-mem-gb must be positive (got {args.gpu_mem_gb})")
        device_bytes = int(args.gpu_mem_gb * GIB)
    for flag, value in (("--tp", args.tp), ("--pp", args.pp), ("--attention-dp", args.attn_dp)):
        if value < 1:
            parser.error(f"{flag} must be >= 1 (got {value})")
    if args.context_length is not None and args.context_length <= 0:
        parser.error(f"--context-length must be positive (got {args.context_length})")
    if args.weights_gb is not None and args.weights_gb < 0:
        parser.error(f"--weights-gb must be >= 0 (got {args.weights_gb})")
    return PlanInputs(
        model=args.model_config,
        device_memory_bytes=device_bytes,
        tp=args.tp,
        pp=args.pp,
        attn_dp=args.attn_dp,
        mem_fraction_static=args.mem_fraction_static,
        kv_cache_dtype=args.kv_cache_dtype,
        page_size=args.page_size,
        max_running_requests=args.max_running_requests,
        cuda_graph_max_bs=args.cuda_graph_max_bs,
        disable_cuda_graph=args.disable_cuda_graph,
        attention_backend=args.attention_backend,
        speculative_draft_tokens=args.speculative_num_draft_tokens,
        speculative_eagle_topk=args.speculative_eagle_topk,
        speculative_num_steps=args.speculative_num_steps,
        context_length=args.context_length,
        allow_longer_context=args.allow_longer_context,
        max_total_tokens=args.max_total_tokens,
        swa_full_tokens_ratio=args.swa_full_tokens_ratio,
        weight_bytes_per_gpu=None if args.weights_gb is None else int(args.weights_gb * GIB),
        pre_load_overhead_bytes=int(args.pre_load_overhead_gb * GIB),
        chunked_prefill_size=args.chunked_prefill_size,
    )


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
    on_gpu = result.attention_backend != "torch_native"
    lazy = {f["name"]: f for f in result.segmented.lazy_graph_buffers}
    for a in result.static.allocations:
        if a.name in lazy:
            segmented = f"{lazy[a.name]['capture_commit_bytes']:,}"
        elif a.name != "req_to_token":
            segmented = f"{a.bytes:,} *"  # not lazy yet: allocated at upstream's size
        elif on_gpu:
            worst = min(a.bytes, (result.segmented.max_num_reqs + 1) * GPU_VMM_GRANULARITY)
            segmented = f"<= {worst:,}"
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
    if on_gpu:
        lines.append(
            f"  segmented req_to_token: reserved; rows committed as used, in "
            f"{GPU_VMM_GRANULARITY >> 20} MiB granules: worst case one per request slot for "
            f"requests under {GPU_VMM_GRANULARITY // 4:,} tokens"
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


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = build_parser()
    args = parser.parse_args(argv)
    inputs = inputs_from_args(args, parser)
    try:
        result = plan(inputs)
    except PlanError as exc:
        parser.error(str(exc))
    text = json.dumps(result.to_dict(), indent=2) if args.json else render(result)
    try:
        print(text)
    except BrokenPipeError:
        # Piped into `head`: not an error worth a traceback.
        sys.stderr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
