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
    mode: str | None = None
    reason: str = ""
    requested_context_length: int | None = None
    effective_context_length: int | None = None
    token_capacity: int | None = None
    max_running_requests: int | None = None
    req_to_token_bytes: int | None = None
    # Filled by segmented mode; None elsewhere.
    segments: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.segments is None:
            out.pop("segments")
        return out


STATE = KvAllocState()
