"""Attention backends' cuda-graph index buffers, reserved at upstream's shape and committed
as far as the replayed batch needs (`LazyGraphBuffer`), given back at idle. The layouts
and what a replay commits of them: `graph_layouts`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sglang.srt.mem_cache.segmented.graph_layouts import (
    CHUNK_ROWS,
    GraphBatch,
    GraphBufferLayout,
)
from sglang.srt.mem_cache.segmented.row_commits import RowCommits

if TYPE_CHECKING:
    from sglang.srt.mem_cache.segmented.backing import Backing

__all__ = ["LazyGraphBuffer"]


class LazyGraphBuffer:
    """One reserved buffer of a `GraphBufferLayout`, committed before each replay as far as
    it writes, and given back at idle (a sync point: no graph is reading it)."""

    def __init__(self, layout: GraphBufferLayout, backing: Backing) -> None:
        if backing.reserved_bytes < layout.reserved_bytes:
            raise ValueError(
                f"graph buffer {layout.name}: backing holds {backing.reserved_bytes} B, the "
                f"layout needs {layout.reserved_bytes} B"
            )
        self.layout = layout
        self.backing = backing
        self.granularity = backing.granularity
        self._flat_end = 0  # FLAT: committed prefix, in bytes (granule multiple)
        # A replay writes and reads what it committed for itself, so committing more for the
        # next one touches nothing a replay in flight uses: no device wait (Llama-4's chunked
        # tables excepted: upstream may zero them whole, scratch included).
        self._rows = RowCommits(
            backing,
            layout.rows,
            layout.row_bytes,
            commits_unused=layout.kind != CHUNK_ROWS,
        )
        # ROWS fast path: rows [0, _rows_ready) hold at least _prefix_ready bytes each.
        self._rows_ready = 0
        self._prefix_ready = 0
        self.commits = 0
        self.releases = 0

    @property
    def committed_bytes(self) -> int:
        return self.backing.committed_bytes

    def needs_commit(self, batch: GraphBatch) -> bool:
        """Whether `ensure` would commit anything for ``batch`` (host arithmetic
        only)."""
        layout = self.layout
        if batch.rows <= 0:
            return False
        if layout.single_list:
            return layout.items_needed(batch) * layout.item_bytes > self._flat_end
        rows = layout.rows_written(batch)
        prefix = layout.items_needed(batch) * layout.item_bytes
        return not (rows <= self._rows_ready and prefix <= self._prefix_ready)

    def ensure(self, batch: GraphBatch) -> int:
        """Commit what ``batch`` writes; returns the bytes newly committed. MemoryError
        (and nothing the graph could read half-committed) if the device cannot back it.
        """
        if not self.needs_commit(batch):
            return 0
        layout = self.layout
        if layout.single_list:
            g = self.granularity
            need = -(-(layout.items_needed(batch) * layout.item_bytes) // g) * g
            need = min(need, self.backing.reserved_bytes)
            # One new mapping past the committed prefix (ranges are committed whole), where no
            # replay in flight writes or reads: no device wait.
            self.backing.commit(self._flat_end, need - self._flat_end, unused=True)
            grown = need - self._flat_end
            self._flat_end = need
            self.commits += 1
            return grown
        rows = layout.rows_written(batch)
        prefix = layout.items_needed(batch) * layout.item_bytes
        before = self.backing.committed_bytes
        for row in range(rows):
            self._rows.ensure(row, prefix)
        if rows >= self._rows_ready and prefix >= self._prefix_ready:
            self._rows_ready, self._prefix_ready = rows, prefix
        elif rows >= self._rows_ready:
            self._rows_ready = rows
            self._prefix_ready = min(self._prefix_ready, prefix)
        grown = self.backing.committed_bytes - before
        if grown:
            self.commits += 1
        return grown

    def rows_backed(self) -> int:
        """CHUNK_ROWS: the leading rows in committed memory (the last granule's rows
        included, the last row possibly in part). Rows past them read the scratch
        granule's zeros, so a fill of zeros there changes nothing."""
        if self.layout.kind != CHUNK_ROWS:
            raise ValueError(
                f"graph buffer {self.layout.name}: rows_backed is for {CHUNK_ROWS}"
            )
        if not self._rows_ready:
            return 0
        g, row_bytes = self.granularity, self.layout.row_bytes
        end = -(-(self._rows_ready * row_bytes) // g) * g
        return min(self.layout.rows, -(-end // row_bytes))

    def release(self) -> int:
        """Give back everything committed; returns the bytes released. Only where no kernel
        can read the buffer (idle); the next replay commits again before its fill."""
        before = self.backing.committed_bytes
        if self.layout.single_list:
            if self._flat_end:
                self.backing.release(0, self._flat_end)
                self._flat_end = 0
        else:
            for row in range(self._rows_ready):
                self._rows.drop(row)
            self._rows.flush()
            self._rows_ready = self._prefix_ready = 0
        released = before - self.backing.committed_bytes
        if released:
            self.releases += 1
        return released
