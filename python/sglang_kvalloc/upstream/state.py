"""Per-process record of what the KV allocation layer decided and holds.

Filled in the scheduler process when the pools are built, read by `/server_info` (through
the scheduler's internal state) and by the metrics collector.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class KvAllocState:
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
    run_time_room_bytes: int = 0
    # Live objects (not reported as such): segmented mode reads its figures from them.
    allocator: Any = dataclasses.field(default=None, repr=False)
    req_to_token_pool: Any = dataclasses.field(default=None, repr=False)

    def segment_stats(self, include_resident: bool = False) -> dict[str, Any] | None:
        """Segmented-mode figures. `include_resident` adds a mincore(2) scan of the whole
        req_to_token reservation (82 GB at 10M context): for /server_info, not the periodic
        metrics refresh."""
        stats = getattr(self.allocator, "segment_stats", None)
        if stats is None:
            return None
        out = stats()
        from sglang_kvalloc.upstream import graph_buffers

        if graph_buffers.BUFFERS:
            out.update(graph_buffers.stats())
        from sglang_kvalloc.upstream.segmented import SETTINGS

        device = getattr(SETTINGS.backings, "device", None)
        if device is not None:  # the CUDA VMM backing: how much driver work serving took
            out["vmm"] = {
                "device_synchronizes": int(getattr(device.api, "syncs", 0)),
                "handles_created": device.handles_created,
                "spare_hits": device.spare_hits,
                "spare_misses": device.spare_misses,
                "reclaims": device.reclaims,
            }
        rows = getattr(self.req_to_token_pool, "row_commit_failures", None)
        if rows is not None:
            out["req_to_token_row_commit_failures"] = rows
        out["rope_committed_bytes"] = self.rope_committed_bytes
        out["run_time_room_bytes"] = self.run_time_room_bytes
        resident = getattr(self.req_to_token_pool, "resident_bytes", None)
        if include_resident and resident is not None:
            out["req_to_token_resident_bytes"] = resident()
        return out

    def as_dict(self) -> dict[str, Any]:
        out = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("allocator", "req_to_token_pool", "device")
        }
        segments = self.segment_stats(include_resident=True)
        if segments is not None:
            out["segments"] = segments
        return out


STATE = KvAllocState()
