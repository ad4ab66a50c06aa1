"""The shapes and fill patterns of attention backends' context-sized cuda-graph buffers,
and what one replay commits of them (torch-free, so an estimate outside a server can
size them too; `graph_buffers` commits them).

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

`GraphBufferLayout.commit_bytes` is what a batch commits from empty; `LazyGraphBuffer`
commits exactly that, and an estimate prints the same (one shared function).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CHUNK_ROWS",
    "FLAT",
    "GraphBatch",
    "GraphBufferLayout",
    "ROWS",
    "VERIFY_MASK",
    "capture_batch",
    "draft_graph_batch",
    "fa3_local_attention_layouts",
    "fa3_page_table_layout",
    "fa3_swa_spec_page_table_layout",
    "flashinfer_custom_mask_layout",
    "flashinfer_draft_kv_indices_layout",
    "flashinfer_kv_indices_layout",
    "triton_draft_kv_indices_layout",
    "triton_kv_indices_layout",
    "verify_mask_layout",
]

FLAT = "flat"
ROWS = "rows"
CHUNK_ROWS = "chunk_rows"
KINDS = (FLAT, ROWS, CHUNK_ROWS)
VERIFY_MASK = "speculative verify mask"


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
        """Rows a replay of ``batch`` writes: every list of a FLAT buffer, the batch's
        rows of a table, and for CHUNK_ROWS one per chunk the query tokens of each row
        span (q consecutive positions span at most 1 + ceil((q - 1) / chunk) chunks)
        plus one."""
        if self.kind == FLAT:
            return self.rows
        if self.kind == CHUNK_ROWS:
            spans = 1 + -(-(batch.tokens_per_row - 1) // self.chunk_positions)
            return min(batch.rows * spans + 1, self.rows)
        if self.per_query_token:
            return min(batch.rows * batch.tokens_per_row, self.rows)
        return min(batch.rows, self.rows)

    def items_needed(self, batch: GraphBatch) -> int:
        """FLAT: items written in total; ROWS: items written in each of the batch's
        rows.

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


def capture_batch(captured_bs: int, tokens_per_row: int = 1) -> GraphBatch:
    """The batch graph capture fills: every captured row at upstream's seq_len_fill_value (1)."""
    return GraphBatch(captured_bs, captured_bs, 1, max(1, tokens_per_row))


def triton_kv_indices_layout(
    max_num_tokens: int, context_len: int
) -> GraphBufferLayout:
    """Mirrors TritonAttnBackend.init_cuda_graph_state: ``cuda_graph_kv_indices`` =
    zeros((max_num_tokens * max_context_len,), int64), ragged indices end to end."""
    return GraphBufferLayout(
        "triton cuda_graph_kv_indices", FLAT, 1, max_num_tokens * context_len, 8
    )


def triton_draft_kv_indices_layout(
    steps: int, max_bs: int, topk: int, context_len: int
) -> GraphBufferLayout:
    """Mirrors TritonMultiStepDraftBackend.init_cuda_graph_state:
    ``cuda_graph_kv_indices`` = zeros((speculative_num_steps, max_bs x topk x
    max_context_len), int64) (speculative/spec_utils.py draft_kv_indices_buffer_width);
    each step's row holds its ragged lists end to end (``seq_lens_sum x topk + branches
    x step`` items)."""
    return GraphBufferLayout(
        "triton draft cuda_graph_kv_indices",
        FLAT,
        steps,
        max_bs * topk * context_len,
        8,
    )


def flashinfer_draft_kv_indices_layout(
    steps: int, max_bs: int, topk: int, context_len: int
) -> GraphBufferLayout:
    """Mirrors FlashInferMultiStepDraftBackend.init_cuda_graph_state: the same shape as
    triton's draft buffer in int32, each step's row sliced to
    ``draft_kv_indices_used_len`` as triton's."""
    return GraphBufferLayout(
        "flashinfer draft cuda_graph_kv_indices",
        FLAT,
        steps,
        max_bs * topk * context_len,
        4,
    )


def draft_graph_batch(
    rows: int, seq_lens_sum: int, max_seq_len: int, topk: int, steps: int
) -> GraphBatch:
    """What a draft-decode replay of ``rows`` requests fills: ``topk`` branches per
    request, each growing by one position per step (covers
    spec_utils.draft_kv_indices_used_len)."""
    topk = max(1, topk)
    return GraphBatch(
        rows * topk, seq_lens_sum * topk, max_seq_len + steps, max(1, steps)
    )


def flashinfer_kv_indices_layout(
    max_num_tokens: int, context_len: int, page_size: int
) -> GraphBufferLayout:
    """Mirrors FlashInferAttnBackend.init_cuda_graph_state: each wrapper's
    ``cuda_graph_kv_indices`` = zeros((max_num_tokens * max_context_len,), int32),
    filled with page ids end to end."""
    return GraphBufferLayout(
        "flashinfer cuda_graph_kv_indices",
        FLAT,
        1,
        max_num_tokens * context_len,
        4,
        page_size,
    )


def flashinfer_custom_mask_layout(
    max_num_tokens: int, context_len: int
) -> GraphBufferLayout:
    """Mirrors FlashInferAttnBackend.init_cuda_graph_state: ``cuda_graph_custom_mask`` =
    zeros((max_num_tokens * max_context_len,), uint8), one byte per (query token,
    position)."""
    return GraphBufferLayout(
        "flashinfer cuda_graph_custom_mask",
        FLAT,
        1,
        max_num_tokens * context_len,
        1,
        per_query_token=True,
    )


def verify_mask_layout(max_bs: int, draft: int, context_len: int) -> GraphBufferLayout:
    """Mirrors layers/attention/verify_mask.py maybe_create_verify_mask (FULL_MASK, the
    GPU layout): ``tree_mask_numel`` = max_bs x draft x (max_context_len + draft) bytes;
    the draft stage writes ``draft x (seq_len + draft)`` per request, end to end."""
    return GraphBufferLayout(
        VERIFY_MASK,
        FLAT,
        1,
        max_bs * draft * (context_len + draft),
        1,
        per_query_token=True,
    )


def fa3_page_table_layout(
    max_bs: int, context_len: int, page_size: int
) -> GraphBufferLayout:
    """Mirrors FlashAttentionBackend.init_cuda_graph_state: each page table is
    zeros((max_bs, ceil(max_context_len / page_size)), int32), one row per batch row."""
    pages = -(-context_len // page_size)
    return GraphBufferLayout("fa3 page table", ROWS, max_bs, pages, 4, page_size)


def fa3_swa_spec_page_table_layout(
    max_bs: int, draft: int, context_len: int
) -> GraphBufferLayout:
    """Mirrors FlashAttentionBackend.init_cuda_graph_state with top-k > 1 and a sliding
    window: ``target_verify_metadata_topk_swa["page_table"]`` = zeros((max_bs x draft,
    context + draft), int32), one row per draft token, which
    ``prepare_swa_spec_page_table_triton`` fills up to its request's length plus its
    draft positions (page size 1 only)."""
    return GraphBufferLayout(
        "fa3 swa-spec page table",
        ROWS,
        max_bs * draft,
        context_len + draft,
        4,
        per_query_token=True,
    )


def fa3_local_attention_layouts(
    max_bs: int, context_len: int, chunk: int, page_size: int
) -> list[GraphBufferLayout]:
    """Mirrors layers/attention/local_attention.py
    LocalAttentionMetadataBuilder.alloc_cuda_graph_buffers (Llama-4's chunked local
    attention under fa3): ``max_bs x ceil(context / chunk)`` virtual batches, each a row
    of ``local_block_table`` (``ceil(chunk / page)`` int32 page ids) and an entry of
    ``local_seqused_k`` and ``local_query_start_loc`` (one more). ``update_for_replay``
    writes a row per (request, chunk its query tokens reach) and zeroes the rest."""
    virtual = max_bs * -(-context_len // chunk)
    per_block = -(-chunk // page_size)
    return [
        GraphBufferLayout(
            "fa3 local_block_table",
            CHUNK_ROWS,
            virtual,
            per_block,
            4,
            page_size,
            chunk_positions=chunk,
        ),
        GraphBufferLayout(
            "fa3 local_seqused_k", CHUNK_ROWS, virtual, 1, 4, chunk_positions=chunk
        ),
        GraphBufferLayout(
            "fa3 local_query_start_loc",
            CHUNK_ROWS,
            virtual + 1,
            1,
            4,
            chunk_positions=chunk,
        ),
    ]


# What static mode allocates of these buffers at the context, which `auto` weighs.
@dataclass(frozen=True)
class AttentionGraphShape:
    """What decides which context-sized cuda-graph buffers a backend allocates, each
    as the backend reads it at init."""

    mla: bool = False
    # The runner's sliding window is set: flashinfer's second wrapper (and index buffer),
    # fa3's per-draft-token verify table with top-k > 1.
    sliding_window: bool = False
    # flashinfer's second wrapper for cross attention.
    encoder_decoder: bool = False
    # fa3: a sliding-window twin of each page table (a sliding-window KV pool).
    hybrid_swa: bool = False
    # fa3: Llama-4's chunked local attention, its chunk.
    local_attention_chunk: int | None = None
    draft_tokens: int = 0
    topk: int = 1
    draft_steps: int = 0


def context_sized_graph_bytes(
    backend: str,
    max_bs: int,
    context_len: int,
    page_size: int,
    shape: AttentionGraphShape,
) -> int:
    """Bytes of the decode runner's attention backend's context-sized cuda-graph
    buffers at upstream's size, and with multi-step speculative decoding those of the
    draft worker's backend (the same kind). ``max_bs`` is the captured batch."""
    if max_bs <= 0 or backend == "torch_native":
        return 0
    draft = shape.draft_tokens
    tokens = max_bs * max(1, draft)
    mask = verify_mask_layout(max_bs, draft, context_len).reserved_bytes if draft else 0
    if backend == "triton":
        target = triton_kv_indices_layout(tokens, context_len).reserved_bytes
        target += mask
    elif backend == "flashinfer" and shape.mla:
        target = max_bs * context_len * 4
    elif backend == "flashinfer":
        wrappers = 2 if shape.sliding_window or shape.encoder_decoder else 1
        indices = flashinfer_kv_indices_layout(tokens, context_len, page_size)
        target = wrappers * indices.reserved_bytes
        target += flashinfer_custom_mask_layout(tokens, context_len).reserved_bytes
    elif backend == "fa3":
        target = _fa3_bytes(max_bs, context_len, page_size, shape)
    else:
        raise ValueError(f"unknown attention backend {backend!r}")
    if not draft or shape.draft_steps <= 1:
        return target
    steps, topk = shape.draft_steps, shape.topk
    if backend == "triton":
        layout = triton_draft_kv_indices_layout(steps, max_bs, topk, context_len)
        return target + layout.reserved_bytes
    if backend == "flashinfer":
        layout = flashinfer_draft_kv_indices_layout(steps, max_bs, topk, context_len)
        return target + layout.reserved_bytes
    if backend == "fa3":  # steps - 1 draft backends, each but the verify mask
        return target + (steps - 1) * (target - (mask if topk > 1 else 0))
    return target


def _fa3_bytes(
    max_bs: int, context_len: int, page_size: int, shape: AttentionGraphShape
) -> int:
    """fa3: its page tables (with a sliding-window twin each on a hybrid model), with
    EAGLE top-k > 1 the per-position tables and the verify mask, its strided indices,
    and Llama-4's local-attention buffers."""
    draft = shape.draft_tokens
    tables = 1 + (1 if shape.hybrid_swa else 0)
    if draft:
        tables += 3 + (2 if shape.hybrid_swa else 0)
    total = (
        tables * fa3_page_table_layout(max_bs, context_len, page_size).reserved_bytes
    )
    if draft and shape.topk > 1:
        total += 2 * fa3_page_table_layout(max_bs, context_len, 1).reserved_bytes
        total += verify_mask_layout(max_bs, draft, context_len).reserved_bytes
        if shape.sliding_window:
            spec_table = fa3_swa_spec_page_table_layout(max_bs, draft, context_len)
            total += spec_table.reserved_bytes
    total += (1 + (2 if draft else 0)) * -(-context_len // page_size) * 8
    chunk = shape.local_attention_chunk
    if chunk:
        layouts = fa3_local_attention_layouts(max_bs, context_len, chunk, page_size)
        total += sum(layout.reserved_bytes for layout in layouts)
    return total
