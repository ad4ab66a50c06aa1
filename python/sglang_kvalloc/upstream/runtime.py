"""Everything the plugin keeps per process, in one object: `RUNTIME`.

Hooks are functions upstream calls; what they share between calls lives here: the settings
segmented mode was asked for, the backing factory of the device, the record the start-up log,
`/server_info` and the gauges read, the lazy cuda-graph buffers and the fixed-address RoPE
caches. Hook modules import this one and no other hook module's state; tests start afresh
with `RUNTIME.reset()`. Nothing here imports upstream.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sglang_kvalloc import modes
from sglang_kvalloc.core.backing import BackingFactory, CpuBackingFactory
from sglang_kvalloc.core.graph_buffers import GraphBatch, LazyGraphBuffer

if TYPE_CHECKING:
    from sglang.srt.mem_cache.allocator.base import BaseTokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

    from sglang_kvalloc.core.rope_cache import FixedAddressRope
    from sglang_kvalloc.core.shared_budget import SharedBudget

logger = logging.getLogger(__name__)


def agree_alone(value: int) -> int:
    """The rank agreement of a single rank: its own value."""
    return value


@dataclasses.dataclass
class SegmentSettings:
    """What segmented mode was asked for; set by the configurator hook in each process."""

    segment_tokens: int | None = None
    hold_off_s: float = modes.DEFAULT_HOLD_OFF_S
    idle_cache_tokens: int = modes.DEFAULT_IDLE_CACHE_TOKENS
    device: str = "cpu"
    # MIN of an int over the ranks that share this KV pool's decisions (attention TP).
    agree: Callable[[int], int] = agree_alone


@dataclasses.dataclass
class KvAllocState:
    """What the KV allocation layer decided and built: the start-up log, `/server_info`
    (`internal_states[i].kv_alloc`) and the gauges read it."""

    requested_mode: str | None = None
    device: str = ""
    mode: str | None = None
    reason: str = ""
    requested_context_length: int | None = None
    effective_context_length: int | None = None
    token_capacity: int | None = None
    max_running_requests: int | None = None
    req_to_token_bytes: int | None = None
    # Segmented mode's two mechanisms: (a) context-scaled tables lazy (every pool kind), (b)
    # the KV pool committed on demand (the kinds segmented supports); why (b) is off if so.
    kv_pool_kind: str | None = None
    lazy_tables: bool = False
    kv_on_demand: bool = False
    kv_on_demand_note: str = ""
    # Explicit commits (a GPU): memory the tables take outside the KV pool, settled at start.
    rope_committed_bytes: int = 0
    # RL's memory release: everything given back until resumed; after a resume the padding
    # row and RoPE caches come back before the first batch.
    kv_released: bool = False
    restore_pending: bool = False
    # req_to_token rows may commit up to row_room_bytes at run time; the KV budget keeps
    # run_time_room_bytes of it free (the rest comes from the slack, as static's table).
    row_room_bytes: int = 0
    run_time_room_bytes: int = 0
    # Live objects (not reported as such): segmented mode reads its figures from them.
    allocator: BaseTokenToKVPoolAllocator | None = dataclasses.field(default=None, repr=False)
    req_to_token_pool: ReqToTokenPool | None = dataclasses.field(default=None, repr=False)


_NOT_REPORTED = ("allocator", "req_to_token_pool", "device")


class GraphBufferRegistry:
    """The lazy cuda-graph buffers of this process (each rank has its own): the decode
    runner's and the draft runners', the verify masks and Llama-4's local-attention tables
    found by the address of the tensor upstream holds, and how often a batch fell back."""

    def __init__(self) -> None:
        self.buffers: list[LazyGraphBuffer] = []
        self.verify_masks: dict[int, LazyGraphBuffer] = {}
        self.local_tables: dict[int, LazyGraphBuffer] = {}
        self.eager_fallbacks = 0
        self.draft_mask_fallbacks = 0

    def ensure_for(self, batch: GraphBatch) -> None:
        """Commit every buffer for ``batch`` (MemoryError if the device cannot)."""
        for buffer in self.buffers:
            buffer.ensure(batch)

    def needs_commit(self, batch: GraphBatch) -> bool:
        return any(buffer.needs_commit(batch) for buffer in self.buffers)

    def release_all(self) -> int:
        """Give back what every buffer holds; returns the bytes released."""
        return sum(buffer.release() for buffer in self.buffers)

    def release_at_idle(self) -> int:
        """`release_all` at idle (no graph is running), logged."""
        released = self.release_all()
        if released:
            logger.info("Idle: released %.2f MB of cuda-graph buffers.", released / 1e6)
        return released

    def stats(self) -> dict[str, int]:
        return {
            "cuda_graph_buffers_reserved_bytes": sum(b.layout.reserved_bytes for b in self.buffers),
            "cuda_graph_buffers_committed_bytes": sum(b.committed_bytes for b in self.buffers),
            "cuda_graph_eager_fallbacks": self.eager_fallbacks,
            "cuda_graph_draft_mask_fallbacks": self.draft_mask_fallbacks,
        }


class RopeCaches:
    """The fixed-address RoPE caches of this process (`core.rope_cache.FixedAddressRope`, a GPU)."""

    def __init__(self) -> None:
        self.caches: list[FixedAddressRope] = []

    def __bool__(self) -> bool:
        return bool(self.caches)

    def add(self, cache: FixedAddressRope) -> None:
        self.caches.append(cache)

    def commit_up_to(self, capacity_tokens: int) -> None:
        """Segmented: commit every cache as far as a position can reach, the KV pool's
        capacity plus upstream's margin (speculative tokens, safety), so nothing grows while
        serving. Past that the reservation stays uncommitted (a 10M context over a 1M pool)."""
        for cache in self.caches:
            cache.grow(capacity_tokens + cache.margin)

    def complete(self) -> int:
        """auto settled on static: commit every cache whole, as upstream would hold it (no
        scheduler hook grows it later). Returns the bytes committed."""
        for cache in self.caches:
            cache.grow(cache.total)
        return self.committed_bytes

    @property
    def committed_bytes(self) -> int:
        return sum(cache.committed_bytes for cache in self.caches)

    def release(self) -> int:
        """RL's memory release: every cache's memory goes back. Returns the bytes."""
        return sum(cache.release() for cache in self.caches)

    def restore(self) -> None:
        """Before the first forward after a release: every cache as it was."""
        for cache in self.caches:
            cache.restore()


class Runtime:
    """The plugin's per-process state (see the module docstring)."""

    settings: SegmentSettings
    backings: BackingFactory
    state: KvAllocState
    graph: GraphBufferRegistry
    rope: RopeCaches

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Back to a fresh process: nothing asked, decided or held."""
        self.settings = SegmentSettings()
        # Makes the reservations on the device in use (CPU mmap, or the CUDA VMM backing).
        self.backings = CpuBackingFactory()
        self.state = KvAllocState()
        self.graph = GraphBufferRegistry()
        self.rope = RopeCaches()
        # The KV budget shared with the device's other servers (--kv-budget), once open.
        self.budget: SharedBudget | None = None

    def segment_stats(self, include_resident: bool = False) -> dict[str, Any] | None:
        """Segmented-mode figures. `include_resident` adds a mincore(2) scan of the whole
        req_to_token reservation (82 GB at 10M context): for /server_info, not the periodic
        metrics refresh."""
        state = self.state
        stats = getattr(state.allocator, "segment_stats", None)
        if stats is None:
            return None
        out = stats()
        if self.graph.buffers:
            out.update(self.graph.stats())
        device = getattr(self.backings, "device", None)
        if device is not None:  # the CUDA VMM backing: how much driver work serving took
            out["vmm"] = {
                "device_synchronizes": int(getattr(device.api, "syncs", 0)),
                "handles_created": device.handles_created,
                "spare_hits": device.spare_hits,
                "spare_misses": device.spare_misses,
                "reclaims": device.reclaims,
            }
        rows = getattr(state.req_to_token_pool, "row_commit_failures", None)
        if rows is not None:
            out["req_to_token_row_commit_failures"] = rows
            out["req_to_token_reach_waits"] = state.req_to_token_pool.reach_waits
        out["rope_committed_bytes"] = state.rope_committed_bytes
        out["run_time_room_bytes"] = state.run_time_room_bytes
        out["row_room_bytes"] = state.row_room_bytes
        resident = getattr(state.req_to_token_pool, "resident_bytes", None)
        if include_resident and resident is not None:
            out["req_to_token_resident_bytes"] = resident()
        return out

    def as_dict(self) -> dict[str, Any]:
        """`internal_states[i].kv_alloc` of `/server_info`."""
        out = {
            f.name: getattr(self.state, f.name)
            for f in dataclasses.fields(self.state)
            if f.name not in _NOT_REPORTED
        }
        segments = self.segment_stats(include_resident=True)
        if segments is not None:
            out["segments"] = segments
        if self.budget is not None:
            out["budget"] = self.budget.snapshot()
        return out


RUNTIME = Runtime()
