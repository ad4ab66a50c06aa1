"""`--kv-alloc-mode auto` in the launcher: clamp `--context-length` before upstream resolves it.

The launcher only estimates the pool (the scheduler sizes it after loading weights), so this
clamp keeps the tokenizer and `/server_info` consistent with what the device can hold; the
scheduler then clamps exactly (`pools.mode_decided`) if the estimate was
high. A context above the model's maximum is clamped to it unless upstream's override
(SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1) is set; the explicit modes keep upstream's error.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import psutil
from sglang.srt.mem_cache.segmented import modes

from sglang_kvalloc.core import planner

if TYPE_CHECKING:
    from sglang.srt.server_args import ServerArgs

logger = logging.getLogger(__name__)

OVERRIDE_ENV = "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"


def _override_allowed() -> bool:
    """Upstream's own test for contexts above the model maximum (`_derive_context_length`)."""
    from sglang.srt.environ import envs

    return bool(envs.SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN.get() or envs.SGLANG_IS_IN_CI.get())


def model_config_and_max_context(server_args: ServerArgs) -> tuple[dict[str, Any], int]:
    """The HF config as upstream loads it (overrides applied) and the context length upstream
    derives from it. Upstream's own loader, so hub ids and `--json-model-override-args` work."""
    from sglang.srt.utils.hf_transformers.common import get_context_length, get_hf_text_config
    from sglang.srt.utils.hf_transformers.config import get_config

    hf_config = get_config(
        str(server_args.model_path),
        trust_remote_code=bool(server_args.trust_remote_code),
        revision=server_args.revision,
        model_override_args=json.loads(server_args.json_model_override_args or "{}"),
    )
    return hf_config.to_dict(), int(get_context_length(get_hf_text_config(hf_config)))


def _device_memory_bytes(device: str | None) -> int:
    if device and device.startswith("cpu"):
        return int(psutil.virtual_memory().available)
    # Upstream's own query (nvidia-smi): no CUDA context in the launcher. Not run on a GPU here.
    from sglang.srt.utils.common import get_device_memory_capacity

    mib = get_device_memory_capacity(device or "cuda")
    if not mib:
        raise RuntimeError(f"device memory of {device!r} unknown")
    return int(mib * (1 << 20))


def launcher_plan(server_args: ServerArgs, cfg: dict[str, Any]) -> planner.Plan | None:
    """The planner's view of one rank's pool, from the launcher (None if it cannot tell)."""
    device = str(server_args.device or "")
    try:
        inputs = planner.PlanInputs(
            model=cfg,
            device_memory_bytes=_device_memory_bytes(device),
            tp=int(server_args.tp_size or 1),
            pp=int(server_args.pp_size or 1),
            mem_fraction_static=server_args.mem_fraction_static,
            kv_cache_dtype=str(server_args.kv_cache_dtype or "auto"),
            page_size=int(server_args.page_size or 1),
            max_total_tokens=server_args.max_total_tokens or None,
            allow_longer_context=True,
            attention_backend="torch_native" if device.startswith("cpu") else "fa3",
            enable_multimodal=server_args.enable_multimodal,
        )
        return planner.plan(inputs)
    except (planner.PlanError, ValueError, KeyError, RuntimeError, AssertionError) as exc:
        logger.info("kv-alloc: no launcher-side pool estimate (%s); the scheduler decides", exc)
        return None


def estimate_capacity_tokens(server_args: ServerArgs, cfg: dict[str, Any]) -> int | None:
    """KV tokens one rank's pool will hold, as far as the launcher can tell."""
    page = int(server_args.page_size or 1)
    if server_args.max_total_tokens:
        return int(server_args.max_total_tokens) // page * page
    plan = launcher_plan(server_args, cfg)
    return None if plan is None else plan.max_total_num_tokens


# KV slot indices are int32 in upstream's req_to_token: no pool (or segment) holds more.


def segment_size_problem(server_args: ServerArgs) -> str | None:
    """Why one segment of `--kv-segment-tokens` cannot hold the model's KV on this device,
    as one line (None if it can, or if that is only known once the scheduler sized the
    pool). The checks that need no model are the flag's (`kv_alloc_hook.kv_alloc_problem`)."""
    try:
        tokens = modes.segment_tokens(server_args)
    except modes.KvAllocModeError:
        return None  # a value out of range: the flag's own step refuses it
    if tokens is None or modes.requested_mode(server_args) == modes.STATIC:
        return None
    try:
        cfg, _ = model_config_and_max_context(server_args)
    except Exception:  # noqa: BLE001 - upstream reports an unreadable model itself
        return None
    plan = launcher_plan(server_args, cfg)
    if plan is None or plan.kv_per_token.pool_cell <= 0:
        return None
    segment_bytes = tokens * plan.kv_per_token.pool_cell
    if segment_bytes > plan.device_memory_bytes:
        return (
            f"--kv-segment-tokens {tokens}: one segment would take {segment_bytes / 1e9:,.1f} GB "
            f"of KV, more than the device's {plan.device_memory_bytes / 1e9:,.1f} GB; the pool "
            f"holds about {plan.max_total_num_tokens} tokens"
        )
    return None


def clamp_context_before_resolve(server_args: ServerArgs, *args: Any, **kwargs: Any) -> None:
    """BEFORE `ServerArgs.resolve_once`: a segment size the model's KV cannot fit is refused
    (for `sglang.Engine`; the command line refused it already), then auto clamps the context
    in the launcher, once per record."""
    if getattr(server_args, "_resolution_finished", False):
        return None
    problem = segment_size_problem(server_args)
    if problem is not None:
        raise modes.KvAllocModeError(problem)
    clamp_context_in_launcher(server_args)
    return None


def clamp_context_in_launcher(server_args: ServerArgs) -> None:
    """auto: clamp `--context-length` to the model maximum (unless upstream's override is set)
    and to the estimated pool, with a WARNING naming both numbers each time."""
    if modes.requested_mode(server_args) != modes.AUTO:
        return
    requested = server_args.context_length
    setattr(server_args, modes.REQUESTED_CONTEXT_ATTR, requested)
    if requested is None:
        return  # the model's own context; the scheduler clamps it if the pool is smaller
    try:
        cfg, model_max = model_config_and_max_context(server_args)
    except Exception as exc:  # noqa: BLE001 - upstream reports an unreadable model itself
        logger.info("auto: model config not readable in the launcher (%s); upstream decides", exc)
        return
    if requested > model_max and not _override_allowed():
        logger.warning(
            "--kv-alloc-mode auto: --context-length %d clamped to %d, the model's maximum "
            "context (upstream refuses more unless %s=1 is set).",
            requested,
            model_max,
            OVERRIDE_ENV,
        )
        server_args.context_length = requested = model_max
    capacity = estimate_capacity_tokens(server_args, cfg)
    if capacity is None or capacity <= 0 or requested <= capacity:
        return
    logger.warning(
        "--kv-alloc-mode auto: --context-length %d clamped to %d: the KV pool holds about %d "
        "tokens per rank (%s), so one request cannot use more. The scheduler checks again "
        "with the exact pool size.",
        requested,
        capacity,
        capacity,
        "--max-total-tokens" if server_args.max_total_tokens else "estimated from device memory",
    )
    server_args.context_length = capacity
