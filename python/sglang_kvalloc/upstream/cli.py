"""`--kv-alloc-mode` on upstream's parser, and the route its value takes to every process.

Upstream's `ServerArgs.from_cli_args` keeps only declared fields, so the parsed value is
attached to the record as the bookkeeping attribute `_kv_alloc_mode`. `ServerArgs.__reduce__`
pickles bookkeeping with the fields, so the scheduler, TP workers and detokenizer receive
it with the record they are spawned with. `sglang.Engine(kv_alloc_mode=...)` reaches the
same attribute through hooks on `Engine.__init__` and `ServerArgs.resolve_once`.
"""

from __future__ import annotations

import argparse
import contextvars
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sglang.srt.mem_cache.segmented import geometry

from sglang_kvalloc import modes
from sglang_kvalloc.core.shared_budget import parse_bytes

if TYPE_CHECKING:
    from sglang.srt.entrypoints.engine import Engine
    from sglang.srt.server_args import ServerArgs

FLAG = "--kv-alloc-mode"
DEST = "kv_alloc_mode"
SEGMENT_TOKENS_DEST = "kv_segment_tokens"
HOLD_OFF_DEST = "kv_segment_hold_off"
IDLE_CACHE_DEST = "kv_idle_cache_tokens"
BUDGET_DEST = "kv_budget"
BUDGET_BYTES_DEST = "kv_budget_bytes"
BUDGET_FLOOR_DEST = "kv_budget_floor"
BUDGET_LIMIT_DEST = "kv_budget_limit"
# Every value this plugin adds to upstream's CLI / Engine keywords -> its ServerArgs attribute.
CARRIED = {
    DEST: modes.SERVER_ARGS_ATTR,
    SEGMENT_TOKENS_DEST: modes.SEGMENT_TOKENS_ATTR,
    HOLD_OFF_DEST: modes.HOLD_OFF_ATTR,
    IDLE_CACHE_DEST: modes.IDLE_CACHE_ATTR,
    BUDGET_DEST: modes.BUDGET_ATTR,
    BUDGET_BYTES_DEST: modes.BUDGET_BYTES_ATTR,
    BUDGET_FLOOR_DEST: modes.BUDGET_FLOOR_ATTR,
    BUDGET_LIMIT_DEST: modes.BUDGET_LIMIT_ATTR,
}
_RAW_MARK = "R|"
# The parser the flags were added to: checks that need several flags report through it
# (one line, exit 2), as argparse reports its own errors.
_PARSER: argparse.ArgumentParser | None = None


def _help_text() -> str:
    lines = [f"How KV memory is allocated (default: {modes.DEFAULT_MODE}; env {modes.MODE_ENV})."]
    lines += [f"  {mode}: {text}" for mode, text in modes.MODE_HELP.items()]
    return _RAW_MARK + "\n".join(lines)


def _keep_marked_lines(formatter_class: type) -> type:
    """A subclass of the parser's formatter that keeps line breaks in help marked 'R|'.

    Upstream's parser reflows help text; the mode list reads better one line per mode.
    Unmarked help (every upstream flag) is formatted exactly as before.
    """
    if getattr(formatter_class, "_kvalloc_raw_lines", False):
        return formatter_class

    class KeepMarkedLinesFormatter(formatter_class):  # type: ignore[misc, valid-type]
        _kvalloc_raw_lines = True

        def _split_lines(self, text: str, width: int) -> list[str]:
            if text.startswith(_RAW_MARK):
                return text[len(_RAW_MARK) :].splitlines()
            return super()._split_lines(text, width)

    return KeepMarkedLinesFormatter


def _mode_type(value: str) -> str:
    """Reject a known mode this build cannot run; unknown names fall to argparse's choices."""
    if value in modes.MODES:
        try:
            modes.validate_mode(value)
        except modes.KvAllocModeError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _tokens(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of tokens, got {value!r}"
        ) from None


def _segment_tokens(value: str) -> int:
    number = _tokens(value)
    problem = geometry.requested_segment_problem(number)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return number


def _non_negative_int(value: str) -> int:
    number = _tokens(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 tokens, got {number}")
    return number


def _hold_off(value: str) -> float:
    try:
        return modes.parse_hold_off(value)
    except modes.KvAllocModeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _bytes(value: str) -> int:
    try:
        return parse_bytes(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_kv_alloc_mode_argument(parser: argparse.ArgumentParser) -> None:
    """Add the flag to a parser that lacks it."""
    global _PARSER
    if any(FLAG in action.option_strings for action in parser._actions):
        return
    _PARSER = parser
    parser.formatter_class = _keep_marked_lines(parser.formatter_class)
    parser.add_argument(
        FLAG,
        dest=DEST,
        type=_mode_type,
        choices=list(modes.MODES),
        default=None,
        help=_help_text(),
    )
    parser.add_argument(
        "--kv-segment-tokens",
        dest=SEGMENT_TOKENS_DEST,
        type=_segment_tokens,
        default=None,
        help="Segmented mode: tokens per KV segment, a multiple of --page-size and at most the "
        "pool capacity; rounded up so each segment spans whole OS pages (default: 8192). "
        f"Env {modes.SEGMENT_TOKENS_ENV}.",
    )
    parser.add_argument(
        "--kv-segment-hold-off",
        dest=HOLD_OFF_DEST,
        type=_hold_off,
        default=None,
        help="Segmented mode: seconds a trailing KV segment must stay empty (and the server "
        "idle, for the idle policy) before memory is given back; 'inf' never gives it back "
        f"(default: {modes.DEFAULT_HOLD_OFF_S:g}). Env {modes.HOLD_OFF_ENV}.",
    )
    parser.add_argument(
        "--kv-idle-cache-tokens",
        dest=IDLE_CACHE_DEST,
        type=_non_negative_int,
        default=None,
        help="Segmented mode: prefix-cache tokens kept when the server has been idle for the "
        "hold-off; cached KV in the highest segments goes first, then least recently used, "
        f"and the emptied segments are given back (default: {modes.DEFAULT_IDLE_CACHE_TOKENS})."
        f" Env {modes.IDLE_CACHE_ENV}.",
    )
    parser.add_argument(
        "--kv-budget",
        dest=BUDGET_DEST,
        default=None,
        metavar="NAME",
        help="Segmented mode: share one KV memory budget, named NAME, with the other servers "
        "on this device that name it: each commits only what the budget has left and gives "
        "back its cached KV when another waits (docs/multi-model.md).",
    )
    parser.add_argument(
        "--kv-budget-bytes",
        dest=BUDGET_BYTES_DEST,
        type=_bytes,
        default=None,
        help="The budget's size (the first server on it gives it; the others may leave it out),"
        " e.g. 40G; each server's KV pool is reserved at this size, not at the free memory.",
    )
    parser.add_argument(
        "--kv-budget-floor",
        dest=BUDGET_FLOOR_DEST,
        type=_bytes,
        default=None,
        help="Bytes of the budget this server can always commit, whatever the others hold.",
    )
    parser.add_argument(
        "--kv-budget-limit",
        dest=BUDGET_LIMIT_DEST,
        type=_bytes,
        default=None,
        help="The most of the budget this server commits (default: all of it).",
    )


def after_add_cli_args(result: None, *args: Any, **kwargs: Any) -> None:
    """AFTER `ServerArgs.add_cli_args(parser)`."""
    for candidate in (*args, *kwargs.values()):
        if isinstance(candidate, argparse.ArgumentParser):
            add_kv_alloc_mode_argument(candidate)
            break
    return None


def attach_mode(server_args: ServerArgs, mode: str | None) -> None:
    """Record the requested mode on the ServerArgs record (None leaves env/default)."""
    if mode is None:
        return
    modes.validate_mode(mode)
    setattr(server_args, modes.SERVER_ARGS_ATTR, mode)


def attach_values(server_args: ServerArgs, values: dict[str, Any]) -> None:
    """Record this plugin's values (by CLI dest / keyword name) on the ServerArgs record."""
    for dest, attr in CARRIED.items():
        value = values.get(dest)
        if value is None:
            continue
        if dest == DEST:
            attach_mode(server_args, value)
        else:
            setattr(server_args, attr, value)


def around_from_cli_args(
    original: Callable[..., ServerArgs], cls: type[ServerArgs], args: argparse.Namespace
) -> ServerArgs:
    """AROUND `ServerArgs.from_cli_args`: carry the parsed flags onto the record."""
    from sglang_kvalloc.upstream import auto  # PR 2 of the upstream series (series.py)

    server_args = original(cls, args)
    try:
        attach_values(server_args, {dest: getattr(args, dest, None) for dest in CARRIED})
        problem = input_problem(server_args) or auto.segment_size_problem(server_args)
    except modes.KvAllocModeError as exc:  # a bad value from the environment
        problem = str(exc)
    if problem is not None:
        (_PARSER or argparse.ArgumentParser()).error(problem)
    return server_args


def input_problem(server_args: ServerArgs) -> str | None:
    """What argparse cannot see, as one line: a mode named in the environment that does not
    exist, a setting out of range, and (where this package's modes act) a context length that
    is not positive."""
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
    if mode == modes.STATIC and modes.budget_settings(server_args) is not None:
        return (
            "--kv-budget shares KV memory that is committed on demand: use --kv-alloc-mode "
            "segmented or auto"
        )
    return None


# The `sglang.Engine(kv_alloc_mode=...)` keyword, between Engine.__init__ and the record it
# builds. ServerArgs is a msgspec Struct whose construction bypasses a patched __init__, so
# the keyword is taken off before upstream sees it and put on the record at resolution.
_ENGINE_VALUES: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "kv_alloc_engine_values", default=None
)


def around_engine_init(
    original: Callable[..., None], self: Engine, *args: Any, **kwargs: Any
) -> None:
    """AROUND `Engine.__init__`: accept `kv_alloc_mode=`, `kv_segment_tokens=`,
    `kv_segment_hold_off=`, `kv_idle_cache_tokens=`."""
    values = {dest: kwargs.pop(dest) for dest in list(CARRIED) if dest in kwargs}
    if values.get(DEST) is not None:
        modes.validate_mode(values[DEST])
    if values and kwargs.get("server_args") is not None:
        attach_values(kwargs["server_args"], values)
    token = _ENGINE_VALUES.set(values or None)
    try:
        return original(self, *args, **kwargs)
    finally:
        _ENGINE_VALUES.reset(token)


def before_resolve_once(self: ServerArgs, *args: Any, **kwargs: Any) -> None:
    """BEFORE `ServerArgs.resolve_once`: Engine keywords land on the record it built, then
    `auto` clamps the context in the launcher (see `auto.clamp_context_in_launcher`)."""
    if getattr(self, "_resolution_finished", False):
        return None
    values = _ENGINE_VALUES.get()
    from sglang_kvalloc.upstream import auto  # PR 2 of the upstream series (series.py)

    if values:
        attach_values(
            self, {d: v for d, v in values.items() if getattr(self, CARRIED[d], None) is None}
        )
    problem = input_problem(self) or (auto.segment_size_problem(self) if values else None)
    if problem is not None:
        raise modes.KvAllocModeError(problem)
    auto.clamp_context_in_launcher(self)
    return None


def after_resolved_dict(
    result: dict[str, Any], self: ServerArgs, *args: Any, **kwargs: Any
) -> None:
    """AFTER `ServerArgs.resolved_dict`: `/server_info` shows the mode with the other args."""
    result[DEST] = modes.requested_mode(self)
    return None
