"""`--kv-alloc-mode auto` in the launcher: clamp `--context-length` before upstream resolves it.

The launcher only estimates the pool (the scheduler sizes it after loading weights), so this
clamp keeps the tokenizer and `/server_info` consistent with what the device can hold; the
scheduler then clamps exactly (`pools.around_resolve_memory_pool_config`) if the estimate was
high. A context above the model's maximum without upstream's override is left alone, so
upstream's own error reaches the operator.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from sglang_kvalloc import modes
from sglang_kvalloc.core import planner

logger = logging.getLogger(__name__)

OVERRIDE_ENV = "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"


def _override_allowed() -> bool:
    return os.environ.get(OVERRIDE_ENV, "").strip().lower() in ("1", "true", "yes")


def _device_memory_bytes(device: str | None) -> int:
    if device and device.startswith("cpu"):
        import psutil

        return int(psutil.virtual_memory().available)
    import torch  # GPU path: not run on a GPU here

    return int(torch.cuda.get_device_properties(0).total_memory)


def estimate_capacity_tokens(server_args: Any, cfg: dict[str, Any]) -> int | None:
    """KV tokens one rank's pool will hold, as far as the launcher can tell."""
    page = int(server_args.page_size or 1)
    if server_args.max_total_tokens:
        return int(server_args.max_total_tokens) // page * page
    device = str(server_args.device or "")
    try:
        inputs = planner.PlanInputs(
            model=planner.model_spec_from_config(cfg),
            device_memory_bytes=_device_memory_bytes(device),
            tp=int(server_args.tp_size or 1),
            pp=int(server_args.pp_size or 1),
            mem_fraction_static=server_args.mem_fraction_static,
            kv_cache_dtype=str(server_args.kv_cache_dtype or "auto"),
            page_size=page,
            allow_longer_context=True,
            attention_backend="torch_native" if device.startswith("cpu") else "fa3",
        )
        return planner.plan(inputs).max_total_num_tokens
    except (planner.PlanError, ValueError, KeyError, RuntimeError, AssertionError) as exc:
        logger.info("auto: no launcher-side capacity estimate (%s); the scheduler decides", exc)
        return None


def clamp_context_in_launcher(server_args: Any) -> None:
    if modes.requested_mode(server_args) != modes.AUTO:
        return
    requested = server_args.context_length
    setattr(server_args, modes.REQUESTED_CONTEXT_ATTR, requested)
    if requested is None:
        return  # the model's own context; the scheduler clamps it if the pool is smaller
    try:
        cfg = planner.load_model_config(str(server_args.model_path))
        model_max = planner.derive_context_length(cfg.get("text_config", cfg))
    except (planner.PlanError, OSError, ValueError, KeyError):
        return
    if requested > model_max and not _override_allowed():
        return  # upstream refuses it with its own message
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
