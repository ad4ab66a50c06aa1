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
    DEFAULT_PRE_LOAD_OVERHEAD_BYTES,
    DEFAULT_SWA_FULL_TOKENS_RATIO,
    GIB,
    GPU_PRESETS_MIB,
    KV_CACHE_DTYPES,
    MIB,
    PlanError,
    PlanInputs,
    builtin_model_names,
    plan,
)
from sglang_kvalloc.core.planner.render import render


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
        "--enable-multimodal", action="store_const", const=True, default=None,
        help="as upstream's flag: serve the vision side of a model upstream serves text-only "
        "by default (Llama-4), with its memory reductions",
    )  # fmt: skip
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
        enable_multimodal=args.enable_multimodal,
    )


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
