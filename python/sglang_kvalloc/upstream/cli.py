"""Checks of `--kv-alloc-mode` and its settings that need more than one value, and what
`/server_info` shows of them.

The settings are declared fields of upstream's `ServerArgs` (`KvAlloc`, `upstream/fields.py`):
upstream's parser, `from_cli_args`, `sglang.Engine(...)` keywords and the pickled record carry
them. What a field's own type cannot check (a mode named in the environment, a context length
that is not positive, a segment size against the pool) is upstream's resolution step
`handle_kv_alloc` (`arg_groups/kv_alloc_hook.py`), which the plugin runs after
`handle_gpu_memory_settings` for every record; on the command line the same checks are
argparse errors (one line, exit 2) before anything is resolved.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sglang.srt.arg_groups.kv_alloc_hook import handle_kv_alloc, kv_alloc_problem
from sglang.srt.mem_cache.segmented import modes

if TYPE_CHECKING:
    from sglang.srt.server_args import ServerArgs

DEST = modes.SERVER_ARGS_ATTR


def checked_cli_args(
    server_args: ServerArgs, cls: type[ServerArgs], args: argparse.Namespace
) -> ServerArgs:
    """AROUND `ServerArgs.from_cli_args` (then): what argparse could not check is an argparse
    error all the same (one line, exit 2, no traceback)."""
    try:
        problem = command_problem(server_args)
    except modes.KvAllocModeError as exc:  # a bad value from the environment
        problem = str(exc)
    if problem is not None:
        argparse.ArgumentParser(usage=argparse.SUPPRESS).error(problem)
    return server_args


# The resolution step the checks run after, in the plugin (`register_resolution_hook` takes
# only upstream's own step names); in the upstream series `handle_kv_alloc` is a step of its
# own at the same place of `run_resolution_pipeline`.
RESOLUTION_STEP = "handle_gpu_memory_settings"


def after_gpu_memory_settings(
    server_args: ServerArgs, previous: Callable[[ServerArgs], None]
) -> None:
    """Resolution wrapper of `RESOLUTION_STEP`: upstream's step, then `handle_kv_alloc`."""
    previous(server_args)
    handle_kv_alloc(server_args)


def command_problem(server_args: ServerArgs) -> str | None:
    """What argparse cannot see (`kv_alloc_problem`), then, where a mode that commits on demand
    is asked for a segment size, whether the model's KV fits one (`auto`, PR 2 of the
    upstream series: the only path to it, so the flag's PR stands alone)."""
    problem = kv_alloc_problem(server_args)
    if problem is not None or modes.requested_mode(server_args) == modes.STATIC:
        return problem
    if modes.segment_tokens(server_args) is None:
        return None
    from sglang_kvalloc.upstream import auto

    return auto.segment_size_problem(server_args)


def after_resolved_dict(
    result: dict[str, Any], self: ServerArgs, *args: Any, **kwargs: Any
) -> None:
    """AFTER `ServerArgs.resolved_dict`: `/server_info` shows the mode asked for (the field,
    else the environment, else the default), not None where the field was left unset; a
    hold-off of inf (never give memory back) is null there, as JSON has no infinity (upstream's
    `/server_info` answers 500 on one)."""
    result[DEST] = modes.requested_mode(self)
    hold_off = result.get(modes.HOLD_OFF_ATTR)
    if isinstance(hold_off, float) and not math.isfinite(hold_off):
        result[modes.HOLD_OFF_ATTR] = None
    return None
