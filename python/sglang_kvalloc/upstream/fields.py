"""`--kv-alloc-mode` and its settings as declared fields of upstream's `ServerArgs`.

0.5.23 assembles `ServerArgs` when `sglang.srt.server_args` is imported, from the namespace
Structs it passes to `collect_input_fields`; a field declared there gets its CLI option, its
`sglang.Engine` keyword, its place in the pickled record and in `/server_info` from upstream.
The upstream series lists `KvAlloc` (`srt/arg_groups/fields/kv_alloc.py`) in
`_INPUT_NAMESPACES`; the plugin adds the same Struct to the list `collect_input_fields` is
given, once `early_plugins` has wrapped that function, before `server_args` imports it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

KV_ALLOC_FIELD = "kv_alloc_mode"


def declares_kv_alloc(sources: list[type]) -> bool:
    return any(KV_ALLOC_FIELD in getattr(s, "__struct_fields__", ()) for s in sources)


def with_kv_alloc_fields(collect: Callable[[list[type]], Any]) -> Callable[[list[type]], Any]:
    """`collect_input_fields` that adds `KvAlloc` to ServerArgs' namespaces, in the list
    itself (it is `ServerArgs._NAMESPACES`, which publishes the fields into the `memory` bag);
    once, and not where upstream lists it already (the series applied)."""
    from sglang.srt.arg_groups.fields.memory import Memory

    @functools.wraps(collect)
    def collect_input_fields(sources: list[type]) -> Any:
        if Memory in sources and not declares_kv_alloc(sources):
            from sglang.srt.arg_groups.fields.kv_alloc import KvAlloc

            sources.append(KvAlloc)
        return collect(sources)

    return collect_input_fields
