"""Upstream's PD disaggregation on SGLang's CPU engine: two CUDA-only calls on the prefill side.

The test harness's (an `sglang.srt.plugins` entry point of `sglang-kvalloc-harness`), never
the product's; each hook acts only on the CPU engine, where both calls fail ("Found no NVIDIA
driver"), and leaves CUDA untouched:

- `_send_kv_chunk` stages a transfer's page indices in pinned host memory and records a CUDA
  event when the sender takes host tensors (Mooncake's does). On the CPU the indices are
  host memory already: the sender is told so, and upstream's own numpy path runs.
- `maybe_send_cached_prefix_chunk`, under the overlap scheduler, records a CUDA event on the
  forward stream before an early send of a cached prefix (an optional optimisation, upstream
  says: the final send covers the range). On the CPU engine it is skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sglang_kvalloc_harness.kernels.bootstrap import cpu_engine

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.managers.scheduler import Scheduler

PREFILL = "sglang.srt.disaggregation.prefill.SchedulerDisaggregationPrefillMixin"


def before_send_kv_chunk(scheduler: Scheduler, req: Req, *args: Any, **kwargs: Any) -> None:
    """BEFORE `_send_kv_chunk`: on the CPU engine the sender gets numpy page indices."""
    sender = getattr(req, "disagg_kv_sender", None)
    if sender is not None and cpu_engine():
        sender.supports_host_tensor_indices = False
    return None


def around_maybe_send_cached_prefix_chunk(
    original: Callable[..., None], scheduler: Scheduler, *args: Any, **kwargs: Any
) -> None:
    """AROUND `maybe_send_cached_prefix_chunk`: no early send under overlap on the CPU engine."""
    if getattr(scheduler, "enable_overlap", False) and cpu_engine():
        return None
    return original(scheduler, *args, **kwargs)


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(f"{PREFILL}._send_kv_chunk", before_send_kv_chunk, HookType.BEFORE)
    HookRegistry.register(
        f"{PREFILL}.maybe_send_cached_prefix_chunk",
        around_maybe_send_cached_prefix_chunk,
        HookType.AROUND,
    )
