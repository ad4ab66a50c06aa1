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
from typing import Any

from sglang_kvalloc import modes

FLAG = "--kv-alloc-mode"
DEST = "kv_alloc_mode"
_RAW_MARK = "R|"


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


def add_kv_alloc_mode_argument(parser: argparse.ArgumentParser) -> None:
    """Add the flag to a parser that lacks it."""
    if any(FLAG in action.option_strings for action in parser._actions):
        return
    parser.formatter_class = _keep_marked_lines(parser.formatter_class)
    parser.add_argument(
        FLAG,
        dest=DEST,
        type=_mode_type,
        choices=list(modes.MODES),
        default=None,
        help=_help_text(),
    )


def after_add_cli_args(result: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER `ServerArgs.add_cli_args(parser)`."""
    for candidate in (*args, *kwargs.values()):
        if isinstance(candidate, argparse.ArgumentParser):
            add_kv_alloc_mode_argument(candidate)
            break
    return None


def attach_mode(server_args: Any, mode: str | None) -> None:
    """Record the requested mode on the ServerArgs record (None leaves env/default)."""
    if mode is None:
        return
    modes.validate_mode(mode)
    setattr(server_args, modes.SERVER_ARGS_ATTR, mode)


def around_from_cli_args(original: Callable[..., Any], cls: type, args: argparse.Namespace) -> Any:
    """AROUND `ServerArgs.from_cli_args`: carry the parsed flag onto the record."""
    server_args = original(cls, args)
    attach_mode(server_args, getattr(args, DEST, None))
    return server_args


# The `sglang.Engine(kv_alloc_mode=...)` keyword, between Engine.__init__ and the record it
# builds. ServerArgs is a msgspec Struct whose construction bypasses a patched __init__, so
# the keyword is taken off before upstream sees it and put on the record at resolution.
_ENGINE_MODE: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "kv_alloc_engine_mode", default=None
)


def around_engine_init(original: Callable[..., Any], self: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND `Engine.__init__`: accept the `kv_alloc_mode=` keyword."""
    mode = kwargs.pop(DEST, None)
    if mode is not None:
        modes.validate_mode(mode)
        server_args = kwargs.get("server_args")
        if server_args is not None:
            attach_mode(server_args, mode)
    token = _ENGINE_MODE.set(mode)
    try:
        return original(self, *args, **kwargs)
    finally:
        _ENGINE_MODE.reset(token)


def before_resolve_once(self: Any, *args: Any, **kwargs: Any) -> None:
    """BEFORE `ServerArgs.resolve_once`: an Engine keyword lands on the record it built."""
    mode = _ENGINE_MODE.get()
    if mode is not None and getattr(self, modes.SERVER_ARGS_ATTR, None) is None:
        attach_mode(self, mode)
    return None


def after_resolved_dict(result: dict[str, Any], self: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER `ServerArgs.resolved_dict`: `/server_info` shows the mode with the other args."""
    result[DEST] = modes.requested_mode(self)
    return None
