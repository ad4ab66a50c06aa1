"""The shapes and fill patterns of attention backends' context-sized cuda-graph buffers,
and what one replay commits of them (torch-free: the planner sizes them; `graph_buffers`
commits them).

Upstream sizes these buffers by max batch x context at capture (a triton ``kv_indices``
of ``max_num_tokens x context`` int64 is 41 GB at 512 x 10M). A graph reads them at
fixed addresses, so they cannot be reallocated; they can be reserved (a backing) and
committed before each replay as far as that replay writes, which is known on the host:
the batch's rows, the sum of its sequence lengths and the longest one.

Two layouts cover the index buffers:

- ``flat``: ragged per-request lists laid end to end (triton ``kv_indices``): a replay
  writes the first ``sum(ceil(seq_len / positions_per_item))`` items; with several rows
  (a multi-step draft's ``(steps, width)`` buffer) every row is such a list and a replay
  writes each;
- ``rows``: a ``rows x items`` table indexed by batch row (fa3 page tables): a replay
  writes rows ``[0, batch rows)`` up to ``ceil(longest / positions_per_item)`` items
  each;
- ``chunk_rows``: a table with one row per (request, attention chunk holding its query
  tokens), Llama-4's chunked local attention (fa3's ``local_block_table`` and its two
  per-row vectors): a replay writes whole rows ``[0, batch rows x chunks a row's query
  tokens span]`` plus one (the trailing entry of a cumulative vector), and zeros the
  rest of the table. Those zeros land on the shared scratch granule where nothing is
  committed, which holds zeros already: harmless, as every reader of uncommitted memory
  expects zeros.

`GraphBufferLayout.commit_bytes` is what a batch commits from empty; the planner prints
it and `LazyGraphBuffer` commits exactly that (one shared function).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CHUNK_ROWS", "FLAT", "ROWS", "GraphBatch", "GraphBufferLayout"]

FLAT = "flat"
ROWS = "rows"
CHUNK_ROWS = "chunk_rows"
KINDS = (FLAT, ROWS, CHUNK_ROWS)


@dataclass(frozen=True)
class GraphBatch:
    """What one graph replay (or capture) fills, as the host knows it before the
    fill."""

    rows: int  # batch rows filled: the captured batch size the batch is padded to
    seq_lens_sum: (
        int  # sum of the sequence lengths over those rows (padding rows included)
    )
    max_seq_len: int  # the longest of them
    tokens_per_row: int = 1  # query tokens per row (draft tokens when verifying)


@dataclass(frozen=True)
class GraphBufferLayout:
    """Shape and fill pattern of one context-sized cuda-graph buffer."""

    name: str
    kind: str  # FLAT, ROWS or CHUNK_ROWS
    # ROWS: table rows (the captured max batch); FLAT: lists (1, or draft steps); CHUNK_ROWS:
    # the captured max batch x attention chunks in the context (upstream's virtual batches)
    rows: int
    items: int  # items per row (FLAT: the whole buffer)
    item_bytes: int
    positions_per_item: int = (
        1  # KV positions one item stands for (the page size for tables)
    )
    # FLAT: one item per KV position per query token (a verify mask), not per KV position;
    # ROWS: one row per query token (fa3's top-k sliding-window verify table), not per request.
    per_query_token: bool = False
    chunk_positions: int = 0  # CHUNK_ROWS: the attention chunk, in KV positions

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"layout kind must be one of {KINDS}, got {self.kind!r}")
        if min(self.rows, self.items, self.item_bytes, self.positions_per_item) <= 0:
            raise ValueError(
                f"graph buffer {self.name}: every dimension must be positive"
            )
        if (self.kind == CHUNK_ROWS) != (self.chunk_positions > 0):
            raise ValueError(
                f"graph buffer {self.name}: an attention chunk is given for {CHUNK_ROWS} "
                f"layouts only, and they need one (got {self.chunk_positions})"
            )

    @property
    def row_bytes(self) -> int:
        return self.items * self.item_bytes

    @property
    def reserved_bytes(self) -> int:
        return self.rows * self.row_bytes

    @property
    def single_list(self) -> bool:
        """One ragged list over the whole buffer (committed as one growing prefix)."""
        return self.kind == FLAT and self.rows == 1

    def rows_written(self, batch: GraphBatch) -> int:
        """Rows a replay of ``batch`` writes: every list of a FLAT buffer, the batch's rows
        of a table, and for CHUNK_ROWS one per chunk the query tokens of each row span
        (q consecutive positions span at most 1 + ceil((q - 1) / chunk) chunks) plus
        one."""
        if self.kind == FLAT:
            return self.rows
        if self.kind == CHUNK_ROWS:
            spans = 1 + -(-(batch.tokens_per_row - 1) // self.chunk_positions)
            return min(batch.rows * spans + 1, self.rows)
        if self.per_query_token:
            return min(batch.rows * batch.tokens_per_row, self.rows)
        return min(batch.rows, self.rows)

    def items_needed(self, batch: GraphBatch) -> int:
        """FLAT: items written in total; ROWS: items written in each of the batch's rows.

        One item more per row than the lengths give covers the per-row rounding up and
        the token the step appends; never more than the buffer holds."""
        ppi = self.positions_per_item
        if self.kind == CHUNK_ROWS:
            return (
                self.items
            )  # whole rows: upstream zeroes each written row past its pages
        if self.kind == FLAT:
            per_row_slack = batch.rows * (1 + batch.tokens_per_row)
            need = -(-batch.seq_lens_sum // ppi) + per_row_slack
            if self.per_query_token:
                need *= batch.tokens_per_row
        else:
            need = -(-(batch.max_seq_len + batch.tokens_per_row) // ppi) + 1
        return min(need, self.items)

    def commit_bytes(self, batch: GraphBatch, granularity: int) -> int:
        """Bytes committed for ``batch`` from nothing committed, at ``granularity``."""
        if batch.rows <= 0:
            return 0
        g = granularity
        if self.single_list:
            nbytes = self.items_needed(batch) * self.item_bytes
            return min(-(-nbytes // g) * g, -(-self.reserved_bytes // g) * g)
        prefix = self.items_needed(batch) * self.item_bytes
        granules = 0
        last = -1  # highest granule counted so far (rows go up in address)
        for row in range(self.rows_written(batch)):
            start = row * self.row_bytes
            lo, hi = start // g, -(-(start + prefix) // g)
            granules += hi - max(lo, last + 1)
            last = hi - 1
        return granules * g
