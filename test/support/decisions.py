"""Mode decisions for unit tests that call one hook without the pool sizing that decides.

A server decides once (`Runtime.decide`); a test that checks a hook under both modes decides
again here, as a fresh process would.
"""

from __future__ import annotations

from sglang.srt.mem_cache.segmented import modes
from sglang.srt.mem_cache.segmented.runtime import RUNTIME


def decision(
    mode: str,
    *,
    explicit_commits: bool = False,
    kind: str = "mha",
    kv_pool_problem: str | None = None,
    requested: str | None = None,
) -> modes.ModeDecision:
    segmented = mode == modes.SEGMENTED
    backing = modes.CUDA_VMM if explicit_commits else modes.CPU_MMAP
    return modes.ModeDecision(
        requested=requested or mode,
        mode=mode,
        reason="decided by the test",
        kv_pool_kind=kind,
        kv_pool_problem=kv_pool_problem,
        backing=backing if segmented else modes.NO_BACKING,
        explicit_commits=segmented and explicit_commits,
    )


def decide(mode: str, **kwargs: object) -> modes.ModeDecision:
    """Decide ``mode`` for this test as a fresh process would (any earlier decision dropped)."""
    made = decision(mode, **kwargs)  # type: ignore[arg-type]
    RUNTIME._decision = None
    RUNTIME.decide(made)
    return made


def note_request(mode: str) -> modes.KvAllocRequest:
    """What the scheduler-start hook notes: ``mode`` asked for, every other setting default."""
    RUNTIME.request = modes.KvAllocRequest(
        mode=mode,
        segment_tokens=None,
        hold_off_s=modes.DEFAULT_HOLD_OFF_S,
        idle_cache_tokens=modes.DEFAULT_IDLE_CACHE_TOKENS,
        budget=None,
    )
    return RUNTIME.request
