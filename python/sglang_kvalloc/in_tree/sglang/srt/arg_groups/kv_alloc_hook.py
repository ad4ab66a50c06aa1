"""Resolution step for `--kv-alloc-mode` and its settings: what a field's own type
cannot check (a mode named in the environment, a setting out of range, a context length
that is not positive where a mode that commits on demand acts, a segment size against
the pool).

`handle_kv_alloc` runs in `run_resolution_pipeline` right after
`handle_gpu_memory_settings`, for every record (the command line and `sglang.Engine`),
and raises `ValueError` with one line as the other steps do. `kv_alloc_problem` is the
same check as a string, for the command line to report as an argparse error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

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
