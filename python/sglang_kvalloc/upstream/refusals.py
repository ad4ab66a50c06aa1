"""Where segmented mode cannot run, said in one line before anything is built: parallelism
whose ranks could decide apart, serving features it does not serve yet, decode attention
backends whose cuda-graph buffers it does not cover; and auto's fallback to static where the
device cannot back segmented mode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from sglang.srt.mem_cache.segmented import modes

from sglang_kvalloc.core import planner
from sglang_kvalloc.upstream.pool_kind import kv_pool_bytes

if TYPE_CHECKING:
    from sglang.srt.arg_groups.model_override_base import ResolvingConfig
    from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator
    from sglang.srt.model_executor.pool_configurator import MemoryPoolConfig


def unsupported_parallelism(configurator: KVCacheConfigurator) -> str | None:
    """Why segmented mode cannot run with the parallelism asked for, as one line (None if it
    can). Its commits and graph-or-eager choices are agreed within attention TP only: with
    pipeline stages, or with DP attention ranks that decide graph or eager together before
    each forward (`can_run_decode_cuda_graph`), ranks could go different ways."""
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


def unsupported_feature(configurator: KVCacheConfigurator, *, explicit_commits: bool) -> str | None:
    """Why segmented mode cannot serve a feature asked for, as one line naming the flag (None
    if it can). Each would otherwise go wrong without a word: under PD disaggregation, where
    rows must be committed before they are written (a GPU), upstream's pre-allocation writes
    req_to_token rows outside the scheduler steps that commit them (on the CPU a write
    commits, and the KV pool follows `pd_transfer`); HiCache's
    host pool sits beside an idle policy that would evict the device cache whole; a custom
    memory pool (Mooncake) is ignored by the pools."""
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
# (srt/mem_cache/segmented/attention_graph_buffers.py); torch_native has none.
GRAPH_BACKENDS_COVERED = frozenset({"fa3", "triton", "flashinfer"})


def uncovered_graph_backend(configurator: KVCacheConfigurator) -> str | None:
    """The decode attention backend, named for an operator, when it runs cuda graphs on a GPU
    and segmented mode does not cover its buffers; None otherwise (also off the GPU)."""
    if not str(configurator.device).startswith("cuda"):
        return None
    from sglang.srt.arg_groups.overrides import attention_backends_of, resolving_view
    from sglang.srt.model_executor.cuda_graph_config import Backend

    view = resolving_view(configurator.server_args)
    if decode_graphs_disabled(view, Backend.DISABLED):
        return None
    _, decode = attention_backends_of(view)
    decode = str(decode or "fa3")  # unset: upstream's Hopper default, as the planner assumes
    if decode == "torch_native":
        return None
    if decode not in GRAPH_BACKENDS_COVERED:
        return repr(decode)
    if decode == "flashinfer" and configurator.model_config.hf_config is not None:
        spec = planner.model_spec_from_config(configurator.model_config.hf_config.to_dict())
        if spec.attention == "mla":
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


def static_if_it_fits(
    configurator: KVCacheConfigurator,
    config: MemoryPoolConfig,
    static_bytes: int,
    reason: str,
    why_not: str,
) -> tuple[str, str]:
    """auto wanted segmented but the device cannot do it: static if its context-sized tables
    and the pool fit in free device memory, else a refusal with the numbers."""
    free = free_device_bytes(configurator)
    pool = kv_pool_bytes(configurator, config) or 0
    if free is None or static_bytes + pool <= free:
        return modes.STATIC, f"{reason}; but {why_not}: static fits, so static"
    raise modes.KvAllocModeError(
        f"--kv-alloc-mode auto: {why_not}, and static mode does not fit: its context-sized "
        f"tables take {static_bytes / 1e9:.2f} GB besides the {pool / 1e9:.2f} GB KV pool, with "
        f"{free / 1e9:.2f} GB free; lower --context-length or --max-running-requests"
    )


def free_device_bytes(configurator: KVCacheConfigurator) -> int | None:
    device = str(configurator.device)
    if not device.startswith("cuda"):
        return None
    free, _ = torch.cuda.mem_get_info()
    return int(free)
