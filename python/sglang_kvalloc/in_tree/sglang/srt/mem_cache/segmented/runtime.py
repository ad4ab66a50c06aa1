"""Everything segmented KV allocation keeps per process, in one object: `RUNTIME`.

Hooks are functions upstream calls; what they share between calls lives here: the
settings segmented mode was asked for, the backing factory of the device, the record the
start-up log, `/server_info` and the gauges read, the lazy cuda-graph buffers and the
fixed-address RoPE caches. Hook modules import this one and no other hook module's
state; tests start afresh with `RUNTIME.reset()`. Nothing here imports upstream.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, cast

from sglang.srt.mem_cache.segmented import modes
from sglang.srt.mem_cache.segmented.backing import BackingFactory
from sglang.srt.mem_cache.segmented.cpu_backing import CpuBackingFactory

if TYPE_CHECKING:
    from sglang.srt.mem_cache.allocator.base import BaseTokenToKVPoolAllocator
    from sglang.srt.mem_cache.base_prefix_cache import BasePrefixCache
    from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
    from sglang.srt.mem_cache.segmented.buffers import SegmentedBuffers
    from sglang.srt.mem_cache.segmented.graph_buffers import LazyGraphBuffer
    from sglang.srt.mem_cache.segmented.graph_layouts import GraphBatch
    from sglang.srt.mem_cache.segmented.rope_cache import FixedAddressRope
    from sglang.srt.mem_cache.segmented.shared_budget import SharedBudget

logger = logging.getLogger(__name__)


def agree_alone(value: int) -> int:
    """The rank agreement of a single rank: its own value."""
    return value


class SegmentedKvAllocator(Protocol):
    """What a segmented allocator adds to upstream's (`kv_allocators`): the scheduler
    hooks call it where the decision says the KV pool is committed on demand."""

    split_runs_at_segments: bool

    def scheduler_step(self, demand_tokens: int) -> None: ...
    def note_busy(self) -> None: ...
    def idle_step(self, tree_cache: BasePrefixCache) -> bool: ...
    def maybe_shrink_now(self) -> int: ...
    def suspend(self) -> int: ...
    def resume(self) -> None: ...
    def withheld_size(self) -> int: ...
    def available_size(self) -> int: ...
    def committed_available_size(self) -> int: ...
    def committed_slot_limit(self) -> int: ...
    def segment_stats(self) -> dict[str, Any]: ...


class LazyRows(Protocol):
    """What the lazy req_to_token pool (`lazy_req_to_token`) adds to upstream's: the
    hooks call it where the decision says tables are lazy."""

    row_commit_failures: int

    @property
    def reach_waits(self) -> int: ...
    def release_all(self) -> int: ...
    def restore_padding_row(self) -> None: ...
    def committed_bytes(self) -> int | None: ...
    def resident_bytes(self) -> int: ...


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
    """What the KV allocation layer built and measured under the decision: the start-up
    log, `/server_info` (`internal_states[i].kv_alloc`) and the gauges read it."""

    requested_context_length: int | None = None
    effective_context_length: int | None = None
    # auto: the context it clamped to where the pool was sized (the tokenizer follows).
    clamped_context_length: int | None = None
    token_capacity: int | None = None
    max_running_requests: int | None = None
    req_to_token_bytes: int | None = None
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
    allocator: BaseTokenToKVPoolAllocator | None = dataclasses.field(
        default=None, repr=False
    )
    req_to_token_pool: ReqToTokenPool | None = dataclasses.field(
        default=None, repr=False
    )


_NOT_REPORTED = ("allocator", "req_to_token_pool")


class GraphBufferRegistry:
    """The lazy cuda-graph buffers of this process (each rank has its own): the decode
    runner's and the draft runners', the verify masks and Llama-4's local-attention
    tables found by the address of the tensor upstream holds, and how often a batch fell
    back."""

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
            "cuda_graph_buffers_reserved_bytes": sum(
                b.layout.reserved_bytes for b in self.buffers
            ),
            "cuda_graph_buffers_committed_bytes": sum(
                b.committed_bytes for b in self.buffers
            ),
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
        capacity plus upstream's margin (speculative tokens, safety), so nothing grows
        while serving. Past that the reservation stays uncommitted (a 10M context over a
        1M pool)."""
        for cache in self.caches:
            cache.grow(capacity_tokens + cache.margin)

    def complete(self) -> int:
        """auto settled on static: commit every cache whole, as upstream would hold it
        (no scheduler hook grows it later). Returns the bytes committed."""
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


class DecisionMadeError(RuntimeError):
    """A second, different mode decision in one process (a bug: the decision is made once)."""


class Runtime:
    """Segmented KV allocation's per-process state (see the module docstring)."""

    request: modes.KvAllocRequest | None
    device: str
    settings: SegmentSettings
    backings: BackingFactory
    state: KvAllocState
    graph: GraphBufferRegistry
    rope: RopeCaches
    kv_buffers: list[SegmentedBuffers]

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Back to a fresh process: nothing asked, decided or held."""
        # What this process was asked for and its device, noted when the scheduler starts.
        self.request = None
        self.device = ""
        self._decision: modes.ModeDecision | None = None
        self.settings = SegmentSettings()
        # Makes the reservations on the device in use (CPU mmap, or the CUDA VMM backing).
        self.backings = CpuBackingFactory()
        self.state = KvAllocState()
        self.graph = GraphBufferRegistry()
        self.rope = RopeCaches()
        # This process's segmented KV pools' buffers (a PD transfer engine registers them).
        self.kv_buffers = []
        # The KV budget shared with the device's other servers (--kv-budget), once open.
        self.budget: SharedBudget | None = None

    @property
    def decision(self) -> modes.ModeDecision:
        """The mode this process runs (`modes.UNDECIDED`, static, until it is decided)."""
        return self._decision or modes.UNDECIDED

    @property
    def decided(self) -> bool:
        return self._decision is not None

    def decide(self, decision: modes.ModeDecision) -> None:
        """Write the decision, once per process; the same decision again is a no-op."""
        if self._decision is not None and self._decision != decision:
            raise DecisionMadeError(
                f"mode decided twice: {self._decision} then {decision}"
            )
        self._decision = decision

    def segmented_allocator(
        self, allocator: BaseTokenToKVPoolAllocator | None
    ) -> SegmentedKvAllocator | None:
        """``allocator`` as a segmented one where the KV pool is committed on demand,
        else None (static, the tables-only variant, before the decision)."""
        if not self.decision.kv_on_demand or allocator is None:
            return None
        return cast(SegmentedKvAllocator, allocator)

    def segmented_rows(self, pool: ReqToTokenPool | None) -> LazyRows | None:
        """``pool`` as the lazy req_to_token pool where tables are lazy, else None."""
        if not self.decision.lazy_tables or pool is None:
            return None
        return cast(LazyRows, pool)

    def requested_mode(self) -> str | None:
        """The mode asked for, before the decision (None before the scheduler starts)."""
        return None if self.request is None else self.request.mode

    def segment_stats(self, include_resident: bool = False) -> dict[str, Any] | None:
        """Segmented-mode figures (the KV segments' where the pool is committed on
        demand, the tables' always). `include_resident` adds a mincore(2) scan of the
        whole req_to_token reservation (82 GB at 10M context): for /server_info, not the
        periodic metrics refresh."""
        state, decision = self.state, self.decision
        if not decision.lazy_tables:
            return None
        allocator = self.segmented_allocator(state.allocator)
        out = allocator.segment_stats() if allocator is not None else {}
        if self.graph.buffers:
            out.update(self.graph.stats())
        device = getattr(self.backings, "device", None)
        if (
            device is not None
        ):  # the CUDA VMM backing: how much driver work serving took
            out["vmm"] = {
                "device_synchronizes": int(getattr(device.api, "syncs", 0)),
                "handles_created": device.handles_created,
                "spare_hits": device.spare_hits,
                "spare_misses": device.spare_misses,
                "reclaims": device.reclaims,
            }
        rows = self.segmented_rows(state.req_to_token_pool)
        if decision.explicit_commits and rows is not None:
            out["req_to_token_row_commit_failures"] = rows.row_commit_failures
            out["req_to_token_reach_waits"] = rows.reach_waits
        out["rope_committed_bytes"] = state.rope_committed_bytes
        out["run_time_room_bytes"] = state.run_time_room_bytes
        out["row_room_bytes"] = state.row_room_bytes
        if include_resident and decision.lazy_tables and rows is not None:
            out["req_to_token_resident_bytes"] = rows.resident_bytes()
        return out

    def as_dict(self) -> dict[str, Any]:
        """`internal_states[i].kv_alloc` of `/server_info`."""
        out = self.decision.report()
        out.update(
            (f.name, getattr(self.state, f.name))
            for f in dataclasses.fields(self.state)
            if f.name not in _NOT_REPORTED
        )
        segments = self.segment_stats(include_resident=True)
        if segments is not None:
            out["segments"] = segments
        if self.budget is not None:
            out["budget"] = self.budget.snapshot()
        return out


RUNTIME = Runtime()


def builds_lazy_tables(configurator: KVCacheConfigurator) -> bool:
    """Whether this configurator's tables are the lazy ones (the target worker)."""
    return RUNTIME.decision.lazy_tables and not configurator.is_draft_worker


def builds_kv_on_demand(configurator: KVCacheConfigurator) -> bool:
    """Whether this configurator's KV pool is the segment-committed one."""
    return RUNTIME.decision.kv_on_demand and not configurator.is_draft_worker
