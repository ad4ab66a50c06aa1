"""Config fields of KV allocation: ``--kv-alloc-mode`` and segmented mode's settings.

Published into the ``memory`` namespace with ``Memory``'s fields. Every field defaults
to None: unset, the environment variable named in its help applies, then the default.
"""

from __future__ import annotations

import argparse
from typing import Optional

import msgspec

from sglang.srt.arg_groups.arg_utils import A, Arg
from sglang.srt.mem_cache.segmented.geometry import requested_segment_problem
from sglang.srt.mem_cache.segmented.settings import (
    KV_ALLOC_MODES,
    parse_bytes,
    parse_hold_off_seconds,
    parse_whole_tokens,
)

KV_ALLOC_MODE_HELP = (
    "How KV memory is allocated (default: auto; env SGLANG_KV_ALLOC_MODE). "
    "static: upstream behaviour, pools and tables sized at start-up (max requests x "
    "context). segmented: reserve address space up to the device cap; commit KV memory "
    "one segment at a time as requests need it and give it back when load falls. "
    "auto: clamp the context to what the device holds (with a warning), then static "
    "where that costs nothing extra, segmented where context-sized tables would be "
    "large."
)


def _argument(parse):
    """``parse`` as an argparse type: its ValueError's message becomes the error."""

    def parse_argument(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse_argument.__name__ = parse.__name__
    return parse_argument


def _segment_tokens(text: str) -> int:
    tokens = parse_whole_tokens(text)
    problem = requested_segment_problem(tokens)
    if problem is not None:
        raise ValueError(problem)
    return tokens


def _non_negative_tokens(text: str) -> int:
    tokens = parse_whole_tokens(text)
    if tokens < 0:
        raise ValueError(f"must be >= 0 tokens, got {tokens}")
    return tokens


class KvAlloc(msgspec.Struct):
    """Namespace ``memory``: how the KV pool's memory is allocated."""

    _NS_PATH = "memory"
    kv_alloc_mode: A[
        Optional[str], Arg(help=KV_ALLOC_MODE_HELP, choices=list(KV_ALLOC_MODES))
    ] = None
    kv_segment_tokens: A[
        Optional[int],
        Arg(
            help=(
                "Segmented mode: tokens per KV segment, a multiple of --page-size and "
                "at most the pool capacity; rounded up so each segment spans whole "
                "granules of the memory backing (default: 8192, at most a 16th of "
                "the pool). "
                "Env SGLANG_KV_SEGMENT_TOKENS."
            ),
            type_parser=_argument(_segment_tokens),
        ),
    ] = None
    kv_segment_hold_off: A[
        Optional[float],
        Arg(
            help=(
                "Segmented mode: seconds a trailing KV segment must stay empty (and the "
                "server idle, for the idle policy) before memory is given back; 'inf' "
                "never gives it back (default: 5). Env SGLANG_KV_SEGMENT_HOLD_OFF."
            ),
            type_parser=_argument(parse_hold_off_seconds),
        ),
    ] = None
    kv_idle_cache_tokens: A[
        Optional[int],
        Arg(
            help=(
                "Segmented mode: prefix-cache tokens kept when the server has been idle "
                "for the hold-off; cached KV in the highest segments goes first, then "
                "least recently used, and the emptied segments are given back "
                "(default: 8192). Env SGLANG_KV_IDLE_CACHE_TOKENS."
            ),
            type_parser=_argument(_non_negative_tokens),
        ),
    ] = None
    kv_budget: A[
        Optional[str],
        Arg(
            help=(
                "Segmented mode: share one KV memory budget, named NAME, with the other "
                "servers on this device that name it: each commits only what the "
                "budget has left and gives back its cached KV when another waits."
            ),
        ),
    ] = None
    kv_budget_bytes: A[
        Optional[int],
        Arg(
            help=(
                "The budget's size (the first server on it gives it; the others may "
                "leave it out), e.g. 40G; each server's KV pool is reserved at this "
                "size, not at the free memory."
            ),
            type_parser=_argument(parse_bytes),
        ),
    ] = None
    kv_budget_floor: A[
        Optional[int],
        Arg(
            help="Bytes of the budget this server can always commit, whatever the "
            "others hold.",
            type_parser=_argument(parse_bytes),
        ),
    ] = None
    kv_budget_limit: A[
        Optional[int],
        Arg(
            help="The most of the budget this server commits (default: all of it).",
            type_parser=_argument(parse_bytes),
        ),
    ] = None
