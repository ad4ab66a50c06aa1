"""Segmented `req_to_token` of a PD decode server: upstream's `DecodeReqToTokenPool`
over a reservation.

A decode server's table has a row for every running request and every request being
pre-allocated or transferred: (max running + `--disaggregation-decode-extra-slots` + 1)
x context int32, zero-filled whole at start by upstream (82 GB at 2,049 rows and 10M
context). Here it is a view of a reservation whose pages a first write commits (the CPU
backing): a row costs what a request wrote into it, and a freed row's pages go back at
once. Upstream's free list, generations and pre-allocation bookkeeping are its own,
untouched.

Backings that commit explicitly (a GPU) are refused under PD in this build
(`refusals.unsupported_feature`): upstream's pre-allocation writes rows outside the
scheduler steps where rows are committed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sglang.srt.disaggregation.decode import DecodeReqToTokenPool
from sglang.srt.mem_cache.segmented.lazy_req_to_token import ReservedTable
from sglang.srt.mem_cache.segmented.runtime import RUNTIME

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req

logger = logging.getLogger(__name__)


class SegmentedDecodeReqToTokenPool(DecodeReqToTokenPool):
    """The decode side's req_to_token over reserved memory (see the module docstring)."""

    row_commit_failures = 0  # rows commit on first write: nothing to fail
    reach_waits = 0

    def __init__(
        self,
        size: int,
        max_context_len: int,
        device: str,
        enable_memory_saver: bool,
        pre_alloc_size: int,
    ) -> None:
        # Upstream's bookkeeping with a one-column table, then the table from the reservation.
        super().__init__(size, 1, device, enable_memory_saver, pre_alloc_size)
        factory = RUNTIME.backings
        if not factory.faults_in:
            raise ValueError(
                "the lazy decode req_to_token needs a backing that commits on write"
            )
        self._table = ReservedTable(factory, self._alloc_size, max_context_len)
        self.req_to_token = self._table.tensor
        self.max_context_len = max_context_len
        logger.info(
            "Segmented decode req_to_token: %d x %d int32 reserved (%.3f GB address space; "
            "%d running + %d pre-allocation rows), committed as rows are written.",
            self._alloc_size,
            max_context_len,
            self._table.reserved_bytes / 1e9,
            size,
            pre_alloc_size,
        )

    def free(self, req: Req) -> None:
        row = req.kv.req_pool_idx
        super().free(req)
        self._table.release_rows([row])

    def clear(self) -> None:
        super().clear()
        self._table.release_rows(range(1, self._alloc_size))

    def release_all(self) -> int:
        """RL's memory release (no row in use): every page goes back. Returns the bytes."""
        return self._table.release_all()

    def restore_padding_row(self) -> None:
        """Row 0 reads zeros again after a release: nothing to restore where writes commit."""

    def committed_bytes(self) -> int | None:
        """None: the kernel commits pages on write (see `resident_bytes`)."""
        return None

    def resident_bytes(self) -> int:
        return self._table.resident_bytes()
