"""`--kv-alloc-mode auto`'s context length outside the pool's sizing: clamped to the
model's maximum when the server arguments are resolved, and where the scheduler clamped
it to the pool it sized (`auto_pools`), the same context for the tokenizer.

A context above the model's maximum is clamped to it unless upstream's override
(SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1) is set; the explicit modes keep upstream's
error. What the device holds is known only once the scheduler has loaded the weights
and sized the pool, so the scheduler clamps to it and its start-up handshake carries the
clamp back, as it carries `max_req_input_len`.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from sglang.srt.mem_cache.segmented import modes
from sglang.srt.mem_cache.segmented.runtime import RUNTIME

if TYPE_CHECKING:
    from sglang.srt.entrypoints.engine import SchedulerInitResult
    from sglang.srt.managers.multi_tokenizer_mixin import MultiTokenizerRouter
    from sglang.srt.managers.scheduler import Scheduler
    from sglang.srt.managers.tokenizer_manager import TokenizerManager
    from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator
    from sglang.srt.server_args import ServerArgs

logger = logging.getLogger(__name__)

OVERRIDE_ENV = "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"
# The key of the scheduler's start-up handshake that carries auto's clamp: upstream's own
# field name, as `/server_info` lays the handshake over the resolved arguments.
CLAMPED_CONTEXT_KEY = "context_length"


def _override_allowed() -> bool:
    """Upstream's own test for contexts above the model maximum (`_derive_context_length`)."""
    from sglang.srt.environ import envs

    return bool(
        envs.SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN.get()
        or envs.SGLANG_IS_IN_CI.get()
    )


def model_max_context(server_args: ServerArgs) -> int:
    """The context length upstream derives from the model's config (overrides applied),
    read by upstream's own loader, so hub ids and `--json-model-override-args` work."""
    from sglang.srt.utils.hf_transformers.common import (
        get_context_length,
        get_hf_text_config,
    )
    from sglang.srt.utils.hf_transformers.config import get_config

    hf_config = get_config(
        str(server_args.model_path),
        trust_remote_code=bool(server_args.trust_remote_code),
        revision=server_args.revision,
        model_override_args=json.loads(server_args.json_model_override_args or "{}"),
    )
    return int(get_context_length(get_hf_text_config(hf_config)))


def clamp_context_to_model(server_args: ServerArgs, *args: Any, **kwargs: Any) -> None:
    """Called first in `ServerArgs.resolve_once`: auto clamps `--context-length` to the
    model's maximum (unless upstream's override is set), with a WARNING naming both
    numbers, once per record."""
    if getattr(server_args, "_resolution_finished", False):
        return
    if modes.requested_mode(server_args) != modes.AUTO:
        return
    requested = server_args.context_length
    setattr(server_args, modes.REQUESTED_CONTEXT_ATTR, requested)
    if requested is None or _override_allowed():
        return
    try:
        model_max = model_max_context(server_args)
    except Exception as exc:  # noqa: BLE001 - upstream reports it itself
        logger.info("auto: model config not readable here (%s); upstream decides", exc)
        return
    if requested <= model_max:
        return
    logger.warning(
        "--kv-alloc-mode auto: --context-length %d clamped to %d, the model's maximum "
        "context (upstream refuses more unless %s=1 is set).",
        requested,
        model_max,
        OVERRIDE_ENV,
    )
    server_args.context_length = model_max


def draft_follows_clamp(
    configurator: KVCacheConfigurator, *args: Any, **kwargs: Any
) -> None:
    """Called first in `KVCacheConfigurator.configure`: a speculative draft model was
    built with the target's context before the target's pool was sized; where auto
    clamped that, the draft serves the clamp too, so its attention backends (made
    after the pools) size their buffers for it."""
    clamped = RUNTIME.state.clamped_context_length
    if configurator.is_draft_worker and clamped is not None:
        configurator.model_config.context_len = clamped


def scheduler_follows_clamp(result: None, scheduler: Scheduler) -> None:
    """Called where `Scheduler.init_memory_pools` returns: the scheduler's own model
    config (its start-up line, the `context_len` gauge) states the clamped context."""
    clamped = RUNTIME.state.clamped_context_length
    if clamped is not None:
        scheduler.model_config.context_len = clamped


def clamped_context_in_init_info(
    result: dict[str, Any], scheduler: Scheduler, *args: Any, **kwargs: Any
) -> dict[str, Any]:
    """Called where `Scheduler.get_init_info` returns, with its result: where auto
    clamped the context to the pool, the handshake carries the clamp (and
    `/server_info`, which lays the handshake over the arguments, reports it)."""
    clamped = RUNTIME.state.clamped_context_length
    if clamped is not None:
        result[CLAMPED_CONTEXT_KEY] = clamped
    return result


def context_from_scheduler(
    result: None,
    tokenizer_manager: TokenizerManager | MultiTokenizerRouter,
    scheduler_init_result: SchedulerInitResult,
    *args: Any,
    **kwargs: Any,
) -> None:
    """Called where `Engine._set_startup_time` returns: where the schedulers clamped the
    context to their pools, the tokenizer checks requests against it and `/v1/models`
    reports it (the resolved arguments stay as resolved: they are read-only)."""
    infos = scheduler_init_result.scheduler_infos
    clamps = [int(i[CLAMPED_CONTEXT_KEY]) for i in infos if CLAMPED_CONTEXT_KEY in i]
    model_config = getattr(tokenizer_manager, "model_config", None)
    if not clamps or model_config is None:
        return
    context = min(clamps)
    if context >= tokenizer_manager.context_len:
        return
    logger.info(
        "--kv-alloc-mode auto: the tokenizer serves the context length the scheduler "
        "clamped to, %d tokens (was %d).",
        context,
        tokenizer_manager.context_len,
    )
    tokenizer_manager.context_len = context
    model_config.context_len = context
