"""The KV allocation modes and how the chosen one is found. Upstream-free.

The mode is chosen by `--kv-alloc-mode` (CLI), `kv_alloc_mode=` (`sglang.Engine`), or the
environment variable SGLANG_KV_ALLOC_MODE, in that order of precedence.
"""

from __future__ import annotations

import os

STATIC = "static"
SEGMENTED = "segmented"
AUTO = "auto"
MODES = (STATIC, SEGMENTED, AUTO)
DEFAULT_MODE = STATIC

MODE_ENV = "SGLANG_KV_ALLOC_MODE"
# Bookkeeping attribute on upstream's ServerArgs: not a declared field, so it is kept in the
# record's __dict__, which ServerArgs.__reduce__ pickles to every spawned process.
SERVER_ARGS_ATTR = "_kv_alloc_mode"

MODE_HELP = {
    STATIC: "upstream behaviour: pools and tables sized at start-up (max requests x context).",
    SEGMENTED: "reserve address space up to the device cap; commit KV memory one segment at "
    "a time as requests need it and give it back when load falls.",
    AUTO: "clamp the context to what the device holds (with a warning), then static where "
    "that costs nothing extra, segmented where context-sized tables would be large.",
}

# Modes whose start-up path exists. A mode outside this set fails at start-up with one line
# instead of silently running as static.
IMPLEMENTED_MODES: frozenset[str] = frozenset({STATIC})


class KvAllocModeError(ValueError):
    """A mode that is unknown or not available in this build."""


def validate_mode(mode: str) -> str:
    if mode not in MODES:
        raise KvAllocModeError(
            f"unknown --kv-alloc-mode {mode!r}; choose from {', '.join(MODES)}"
        )
    if mode not in IMPLEMENTED_MODES:
        raise KvAllocModeError(
            f"--kv-alloc-mode {mode} is not available in this build of sglang-kvalloc "
            f"(available: {', '.join(sorted(IMPLEMENTED_MODES))})"
        )
    return mode


def mode_from_env() -> str | None:
    value = os.environ.get(MODE_ENV, "").strip()
    return value or None


def requested_mode(server_args: object | None) -> str:
    """The mode asked for: the record's value, else the environment, else the default."""
    value = getattr(server_args, SERVER_ARGS_ATTR, None) if server_args is not None else None
    return value or mode_from_env() or DEFAULT_MODE
