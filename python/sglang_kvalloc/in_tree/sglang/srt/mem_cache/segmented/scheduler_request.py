"""The process's settings, read once when its scheduler starts.

The model loads before the pools are sized, and its RoPE hook must already know what was
asked for; so the request (`modes.read_request`) and the device are noted on `RUNTIME`
here, before anything else of segmented mode runs in the scheduler process. The mode
itself is decided later, once, where upstream sizes the KV pool (`pools.mode_decided`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sglang.srt.mem_cache.segmented import modes
from sglang.srt.mem_cache.segmented.runtime import RUNTIME

if TYPE_CHECKING:
    from sglang.srt.managers.scheduler import Scheduler
    from sglang.srt.server_args import ServerArgs


def before_scheduler_init(
    self: Scheduler, server_args: ServerArgs, *args: Any, **kwargs: Any
) -> None:
    """Called first in `Scheduler.__init__`: note the request and the device of this
    process."""
    note_request(server_args)
    return None


def note_request(server_args: ServerArgs) -> modes.KvAllocRequest:
    """The request of this process, read from ``server_args`` the first time only."""
    if RUNTIME.request is None:
        RUNTIME.request = modes.read_request(server_args)
        RUNTIME.device = str(getattr(server_args, "device", "") or "")
    return RUNTIME.request
