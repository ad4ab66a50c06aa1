"""Where segmented mode cannot run, said in one line before anything is built:
parallelism whose ranks could decide apart, serving features it does not serve yet,
decode attention backends whose cuda-graph buffers it does not cover.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sglang.srt.arg_groups.model_override_base import ResolvingConfig
    from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator


def unsupported_parallelism(configurator: KVCacheConfigurator) -> str | None:
    """Why segmented mode cannot run with the parallelism asked for, as one line (None
    if it can). Its commits and graph-or-eager choices are agreed within attention TP
    only: with pipeline stages, or with DP attention ranks that decide graph or eager
    together before each forward (`can_run_decode_cuda_graph`), ranks could go different
    ways."""
    server_args = configurator.server_args
    if int(getattr(server_args, "pp_size", 1) or 1) > 1:
        return (
            "--kv-alloc-mode segmented does not agree its commits across pipeline stages: "
            "use --kv-alloc-mode static with --pp-size > 1"
        )
    if not getattr(server_args, "enable_dp_attention", False):
        return None
    if not str(configurator.device).startswith("cuda"):
        return None
    from sglang.srt.arg_groups.overrides import resolving_view
    from sglang.srt.model_executor.cuda_graph_config import Backend

    if decode_graphs_disabled(resolving_view(server_args), Backend.DISABLED):
        return None
    return (
        "--kv-alloc-mode segmented does not agree graph-or-eager across --enable-dp-attention "
        "ranks: use --kv-alloc-mode static, or --cuda-graph-backend-decode=disabled"
    )


def unsupported_feature(
    configurator: KVCacheConfigurator, *, explicit_commits: bool
) -> str | None:
    """Why segmented mode cannot serve a feature asked for, as one line naming the flag
    (None if it can). Each would otherwise go wrong without a word: under PD
    disaggregation, where rows must be committed before they are written (a GPU),
    upstream's pre-allocation writes req_to_token rows outside the scheduler steps that
    commit them (on the CPU a write commits, and the KV pool follows `pd_transfer`);
    HiCache's host pool sits beside an idle policy that would evict the device cache
    whole; a custom memory pool (Mooncake) is ignored by the pools."""
    from sglang.srt.environ import envs

    server_args = configurator.server_args
    static = "use --kv-alloc-mode static"
    pd_mode = str(getattr(server_args, "disaggregation_mode", "null") or "null")
    if pd_mode != "null" and explicit_commits:
        return (
            f"--kv-alloc-mode segmented does not run under --disaggregation-mode {pd_mode} "
            f"on {configurator.device} yet (its event loops write req_to_token rows that this "
            f"device must commit first; the CPU engine runs it): {static}"
        )
    if getattr(server_args, "enable_hierarchical_cache", False):
        return (
            "--kv-alloc-mode segmented does not keep --enable-hierarchical-cache's device "
            f"cache across idle periods yet: {static}"
        )
    if envs.SGLANG_MOONCAKE_CUSTOM_MEM_POOL.get():
        return (
            "--kv-alloc-mode segmented cannot place the KV pool in a custom memory pool "
            f"(SGLANG_MOONCAKE_CUSTOM_MEM_POOL): {static}"
        )
    return None


# Decode attention backends whose context-sized cuda-graph buffers segmented mode reserves
# (`attention_graph_buffers`); torch_native has none.
GRAPH_BACKENDS_COVERED = frozenset({"fa3", "triton", "flashinfer"})


def uncovered_graph_backend(configurator: KVCacheConfigurator) -> str | None:
    """The decode attention backend, named for an operator, when it runs cuda graphs on
    a GPU and segmented mode does not cover its buffers; None otherwise (also off the
    GPU)."""
    if not str(configurator.device).startswith("cuda"):
        return None
    from sglang.srt.arg_groups.overrides import attention_backends_of, resolving_view
    from sglang.srt.model_executor.cuda_graph_config import Backend

    view = resolving_view(configurator.server_args)
    if decode_graphs_disabled(view, Backend.DISABLED):
        return None
    _, decode = attention_backends_of(view)
    decode = str(
        decode or "fa3"
    )  # unset: upstream's Hopper default, as the planner assumes
    if decode == "torch_native":
        return None
    if decode not in GRAPH_BACKENDS_COVERED:
        return repr(decode)
    if decode == "flashinfer" and configurator.use_mla_backend:
        return "'flashinfer' with an MLA model (FlashInferMLAAttnBackend)"
    return None


def decode_graphs_disabled(view: ResolvingConfig, disabled: str) -> bool:
    """Whether decode cuda graphs are off: the resolved config, or before resolution the
    flags that turn them off (upstream's cuda_graph_hook reads the same)."""
    decode = getattr(getattr(view, "cuda_graph_config", None), "decode", None)
    if decode is not None:
        return decode.backend == disabled
    return bool(
        getattr(view, "disable_cuda_graph", False)
        or getattr(view, "disable_decode_cuda_graph", False)
        or getattr(view, "cuda_graph_backend_decode", None) == disabled
    )
