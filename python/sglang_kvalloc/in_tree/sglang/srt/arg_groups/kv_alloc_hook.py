"""Resolution step for `--kv-alloc-mode` and its settings: what a field's own type
cannot check (a mode named in the environment, a setting out of range, a context length
that is not positive where a mode that commits on demand acts, a segment size against
the pool).

`handle_kv_alloc` runs in `run_resolution_pipeline` right after
`handle_gpu_memory_settings`, for every record (the command line and `sglang.Engine`),
and raises `ValueError` with one line as the other steps do. `kv_alloc_problem` is the
same check as a string, which `ServerArgs.from_cli_args` reports as an argparse error
(one line, exit 2) before anything is resolved. `/server_info` shows the mode in force.
"""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING, Any, Optional

from sglang.srt.mem_cache.segmented import geometry, modes

if TYPE_CHECKING:
    from sglang.srt.server_args import ServerArgs


def kv_alloc_problem(server_args: ServerArgs) -> Optional[str]:
    """Why the KV allocation settings of ``server_args`` cannot run, as one line (None
    where they can)."""
    field = getattr(server_args, modes.SERVER_ARGS_ATTR, None)
    if (
        field is not None and field not in modes.MODES
    ):  # sglang.Engine(kv_alloc_mode=...)
        return (
            f"unknown --kv-alloc-mode {field!r}; choose from {', '.join(modes.MODES)}"
        )
    mode = modes.requested_mode(server_args)
    if mode not in modes.MODES:
        return (
            f"{modes.MODE_ENV}={mode!r} is not a --kv-alloc-mode; choose from "
            f"{', '.join(modes.MODES)}"
        )
    try:  # fail in the launcher, on a value the scheduler processes would reject
        modes.read_request(server_args)
    except modes.KvAllocModeError as exc:
        return str(exc)
    context = getattr(server_args, "context_length", None)
    if mode != modes.STATIC and context is not None and int(context) <= 0:
        return f"--context-length must be a positive number of tokens, got {context}"
    tokens = modes.segment_tokens(server_args)
    if tokens is not None:
        problem = geometry.launch_segment_problem(
            tokens, server_args.page_size, server_args.max_total_tokens
        )
        if problem is not None:
            return problem
    if mode == modes.STATIC and modes.budget_settings(server_args) is not None:
        return (
            "--kv-budget shares KV memory that is committed on demand: use "
            "--kv-alloc-mode segmented or auto"
        )
    return None


def handle_kv_alloc(server_args: ServerArgs) -> None:
    """Refuse KV allocation settings that cannot run (`kv_alloc_problem`)."""
    problem = kv_alloc_problem(server_args)
    if problem is not None:
        raise modes.KvAllocModeError(problem)


def checked_cli_args(
    server_args: ServerArgs, cls: type[ServerArgs], args: argparse.Namespace
) -> ServerArgs:
    """Called where `ServerArgs.from_cli_args` returns, with its result: what argparse
    could not check is an argparse error all the same (one line, exit 2, no
    traceback)."""
    try:
        problem = kv_alloc_problem(server_args)
    except modes.KvAllocModeError as exc:  # a bad value from the environment
        problem = str(exc)
    if problem is not None:
        argparse.ArgumentParser(usage=argparse.SUPPRESS).error(problem)
    return server_args


def after_resolved_dict(
    result: dict[str, Any], self: ServerArgs, *args: Any, **kwargs: Any
) -> None:
    """Called where `ServerArgs.resolved_dict` returns, with its result: `/server_info`
    shows the mode asked for (the field, else the environment, else the default), not
    None where the field was left unset; a hold-off of inf (never give memory back) is
    null there, as JSON has no infinity (upstream's `/server_info` answers 500 on
    one)."""
    result[modes.SERVER_ARGS_ATTR] = modes.requested_mode(self)
    hold_off = result.get(modes.HOLD_OFF_ATTR)
    if isinstance(hold_off, float) and not math.isfinite(hold_off):
        result[modes.HOLD_OFF_ATTR] = None
    return None
