"""The plugin's place for `--kv-alloc-mode`'s resolution step.

The settings are declared fields of upstream's `ServerArgs` (`KvAlloc`, `upstream/fields.py`);
what a field's own type cannot check is upstream's resolution step `handle_kv_alloc`
(`arg_groups/kv_alloc_hook.py`). The upstream series writes that step into
`run_resolution_pipeline` right after `handle_gpu_memory_settings`; the plugin wraps that step,
as `register_resolution_hook` takes only upstream's own step names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from sglang.srt.arg_groups.kv_alloc_hook import handle_kv_alloc
from sglang.srt.mem_cache.segmented import modes

if TYPE_CHECKING:
    from sglang.srt.server_args import ServerArgs

DEST = modes.SERVER_ARGS_ATTR
RESOLUTION_STEP = "handle_gpu_memory_settings"


def after_gpu_memory_settings(
    server_args: ServerArgs, previous: Callable[[ServerArgs], None]
) -> None:
    """Resolution wrapper of `RESOLUTION_STEP`: upstream's step, then `handle_kv_alloc`."""
    previous(server_args)
    handle_kv_alloc(server_args)
