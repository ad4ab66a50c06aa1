"""Checks of `--kv-alloc-mode` and its settings that need more than one value, and what
`/server_info` shows of them.

The settings are declared fields of upstream's `ServerArgs` (`KvAlloc`, `upstream/fields.py`):
upstream's parser, `from_cli_args`, `sglang.Engine(...)` keywords and the pickled record carry
them. What a field's own type cannot check (a mode named in the environment, a context length
that is not positive, a segment size against the pool) is checked here: on the command line
as argparse errors (one line, exit 2), for `sglang.Engine` when the record is resolved.
"""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING, Any

from sglang.srt.mem_cache.segmented import geometry

from sglang_kvalloc import modes
from sglang_kvalloc.upstream.inline import then

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
    server_args._kv_alloc_checked = True  # bookkeeping: resolve_once need not check again
    return server_args


around_from_cli_args = then(checked_cli_args)


def command_problem(server_args: ServerArgs) -> str | None:
    """What argparse cannot see (`input_problem`), then, where a mode that commits on demand
    is asked for a segment size, whether the model's KV fits one (`auto`, PR 2 of the
    upstream series: the only path to it, so the flag's PR stands alone)."""
    problem = input_problem(server_args)
    if problem is not None or modes.requested_mode(server_args) == modes.STATIC:
        return problem
    if modes.segment_tokens(server_args) is None:
        return None
    from sglang_kvalloc.upstream import auto

    return auto.segment_size_problem(server_args)


def input_problem(server_args: ServerArgs) -> str | None:
    """What argparse cannot see, as one line: a mode named in the environment that does not
    exist, a setting out of range, and (where this package's modes act) a context length that
    is not positive."""
    field = getattr(server_args, DEST, None)
    if field is not None and field not in modes.MODES:  # sglang.Engine(kv_alloc_mode=...)
        return f"unknown --kv-alloc-mode {field!r}; choose from {', '.join(modes.MODES)}"
    mode = modes.requested_mode(server_args)
    if mode not in modes.MODES:
        return (
            f"{modes.MODE_ENV}={mode!r} is not a --kv-alloc-mode; choose from "
            f"{', '.join(modes.MODES)}"
        )
    try:  # fail early, in the launcher, on a value the workers would reject
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
            "--kv-budget shares KV memory that is committed on demand: use --kv-alloc-mode "
            "segmented or auto"
        )
    return None


def before_resolve_once(self: ServerArgs, *args: Any, **kwargs: Any) -> None:
    """BEFORE `ServerArgs.resolve_once`: the checks of `from_cli_args` for a record built
    otherwise (`sglang.Engine(...)`)."""
    if getattr(self, "_resolution_finished", False):
        return None
    if not getattr(self, "_kv_alloc_checked", False):
        problem = command_problem(self)
        if problem is not None:
            raise modes.KvAllocModeError(problem)
    return None


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
