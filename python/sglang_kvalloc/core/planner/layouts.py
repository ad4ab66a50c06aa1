"""Buffer layouts: every start-up allocation that grows with the context (req_to_token, the
attention backends' cuda-graph buffers), its layout where segmented mode reserves it, and what
segmented mode commits of it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sglang_kvalloc.core.planner.common import MIB, PlanError
from sglang_kvalloc.core.planner.model import LLAMA4_ARCHS, ModelSpec
from sglang_kvalloc.core.planner.server_rules import graph_layouts as _graph_layouts
from sglang_kvalloc.core.planner.server_rules import row_room as _row_room

CHUNK_ROWS, FLAT, ROWS = _graph_layouts.CHUNK_ROWS, _graph_layouts.FLAT, _graph_layouts.ROWS
GraphBatch = _graph_layouts.GraphBatch
GraphBufferLayout = _graph_layouts.GraphBufferLayout
VERIFY_MASK = _graph_layouts.VERIFY_MASK
capture_batch = _graph_layouts.capture_batch
draft_graph_batch = _graph_layouts.draft_graph_batch
fa3_local_attention_layouts = _graph_layouts.fa3_local_attention_layouts
fa3_page_table_layout = _graph_layouts.fa3_page_table_layout
fa3_swa_spec_page_table_layout = _graph_layouts.fa3_swa_spec_page_table_layout
flashinfer_custom_mask_layout = _graph_layouts.flashinfer_custom_mask_layout
flashinfer_draft_kv_indices_layout = _graph_layouts.flashinfer_draft_kv_indices_layout
flashinfer_kv_indices_layout = _graph_layouts.flashinfer_kv_indices_layout
triton_draft_kv_indices_layout = _graph_layouts.triton_draft_kv_indices_layout
triton_kv_indices_layout = _graph_layouts.triton_kv_indices_layout
verify_mask_layout = _graph_layouts.verify_mask_layout

ATTENTION_BACKENDS: tuple[str, ...] = ("triton", "flashinfer", "fa3", "torch_native")
# The CUDA VMM granularity segmented mode commits req_to_token rows in: the RECOMMENDED
# granularity of pinned device memory, 2 MiB on H100/H200 (expected; the GPU suite records it).
GPU_VMM_GRANULARITY = 2 * MIB


def segmented_committed_bytes(
    allocations: list[Allocation],
    max_reqs: int,
    *,
    on_gpu: bool,
    captured_bs: int = 0,
    tokens_per_row: int = 1,
) -> int:
    """What segmented mode commits at start-up of the context-sized allocations, counting each
    running request's first req_to_token granule (the worst case for requests shorter than one
    granule of positions, 524,288 on a GPU; on the CPU pages commit as they are written).

    Lazy cuda-graph buffers count what capturing the largest batch commits (rows of length
    one, upstream's fill value); the others count in full.
    """
    capture = capture_batch(captured_bs, tokens_per_row)
    committed = 0
    for allocation in allocations:
        if allocation.name == "req_to_token":
            if on_gpu:
                committed += min(allocation.bytes, (max_reqs + 1) * GPU_VMM_GRANULARITY)
        elif on_gpu:
            committed += allocation.segmented_commit_bytes(capture)
        else:
            committed += allocation.bytes
    return committed


def req_to_token_extra(speculative_draft_tokens: int = 0) -> int:
    """Row headroom past context_len; mirrors mem_cache/allocation_sizing.py
    get_req_to_token_extra_context_len (4 + draft tokens; spec v2 with page > 1 may add more).
    """
    return 4 + speculative_draft_tokens


@dataclass(frozen=True)
class Allocation:
    """One start-up allocation whose size grows with the context length."""

    name: str
    bytes: int
    formula: str
    upstream: str
    # Segmented mode on a GPU reserves this buffer and commits it per replay (issue 9): its
    # layout (one table of ``copies`` identical ones), else None (allocated at upstream's size).
    lazy: GraphBufferLayout | None = None
    copies: int = 1

    def segmented_commit_bytes(self, batch: GraphBatch) -> int:
        """What segmented mode on a GPU commits of this buffer for ``batch``: the lazy
        layout's arithmetic, or all of it where the buffer is not lazy."""
        if self.lazy is None:
            return self.bytes
        return self.copies * self.lazy.commit_bytes(batch, GPU_VMM_GRANULARITY)


def req_to_token_allocation(max_reqs: int, context_len: int, extra: int) -> Allocation:
    """Mirrors mem_cache/memory_pool.py ReqToTokenPool.__init__:
    torch.zeros((size + 1, max_context_len), int32), max_context_len = context_len + extra
    (kv_cache_configurator.py _build_req_to_token_pool / _build_default_req_pool).
    """
    return Allocation(
        name="req_to_token",
        bytes=_row_room.req_to_token_bytes(max_reqs, context_len, extra),
        formula=f"({max_reqs} + 1) x ({context_len} + {extra}) x 4 B",
        upstream="mem_cache/memory_pool.py ReqToTokenPool.__init__",
    )


_TRITON_UPSTREAM = "layers/attention/triton_backend.py TritonAttnBackend.init_cuda_graph_state"
_FLASHINFER_MLA_UPSTREAM = (
    "layers/attention/flashinfer_mla_backend.py FlashInferMLAAttnBackend.init_cuda_graph_state"
)
_FLASHINFER_UPSTREAM = (
    "layers/attention/flashinfer_backend.py FlashInferAttnBackend.init_cuda_graph_state"
)
_FA3_UPSTREAM = (
    "layers/attention/flashattention_backend.py FlashAttentionBackend.init_cuda_graph_state"
)
_LOCAL_ATTENTION_UPSTREAM = (
    "layers/attention/local_attention.py LocalAttentionMetadataBuilder.alloc_cuda_graph_buffers"
)


def cuda_graph_allocations(
    spec: ModelSpec,
    *,
    backend: str,
    max_bs: int,
    context_len: int,
    page_size: int,
    speculative_draft_tokens: int = 0,
    speculative_topk: int = 1,
    speculative_num_steps: int = 0,
) -> list[Allocation]:
    """Context-sized cuda-graph buffers of the decode runner's attention backend, and with
    speculative decoding (``speculative_num_steps`` > 1) those of the draft worker's
    multi-step backend (the same backend kind; its captured batch is the target's).

    max_bs is the captured batch (min of the cuda-graph max_bs and the request slots, as
    model_executor/runner/base_cuda_graph_runner.py get_batch_sizes_to_capture clamps it);
    tokens per batch row = draft tokens under speculative decoding (decode_cuda_graph_runner
    max_num_token). Each entry names the backend method it mirrors.
    """
    if max_bs <= 0 or backend == "torch_native":
        return []
    draft = speculative_draft_tokens
    if backend == "triton":
        out = _triton_allocations(max_bs, draft, context_len)
    elif backend == "flashinfer" and spec.attention == "mla":
        out = [_flashinfer_mla_allocation(max_bs, context_len)]
    elif backend == "flashinfer":
        out = _flashinfer_allocations(spec, max_bs * max(1, draft), context_len, page_size)
    elif backend == "fa3":
        out = _fa3_allocations(spec, max_bs, context_len, page_size, draft, speculative_topk)
    else:
        raise PlanError(f"unknown attention backend {backend!r}")
    if draft and speculative_num_steps > 1:
        out += _draft_allocations(out, backend, max_bs, speculative_topk, speculative_num_steps,
                                  context_len)  # fmt: skip
    return out


def _triton_allocations(max_bs: int, draft: int, context_len: int) -> list[Allocation]:
    """triton: one int64 index buffer of ``tokens x context`` (tokens = max_bs x draft tokens
    per row under speculative decoding), and with speculative decoding the verify mask."""
    tokens = max_bs * max(1, draft)
    layout = triton_kv_indices_layout(tokens, context_len)
    out = [
        Allocation(
            layout.name,
            layout.reserved_bytes,
            f"{tokens} x {context_len} x 8 B (int64)",
            _TRITON_UPSTREAM,
            lazy=layout,
        )
    ]
    if draft:
        out.append(_verify_mask(max_bs, draft, context_len, "triton_backend.py"))
    return out


def _flashinfer_mla_allocation(max_bs: int, context_len: int) -> Allocation:
    """flashinfer on an MLA model: one int32 index buffer of ``max_bs x context``, allocated at
    upstream's size in segmented mode too (not lazy)."""
    return Allocation(
        "flashinfer_mla cuda_graph_kv_indices",
        max_bs * context_len * 4,
        f"{max_bs} x {context_len} x 4 B (int32)",
        _FLASHINFER_MLA_UPSTREAM,
    )


def _flashinfer_allocations(
    spec: ModelSpec, tokens: int, context_len: int, page_size: int
) -> list[Allocation]:
    """flashinfer: each wrapper's int32 index buffer (two wrappers, and two buffers, when the
    model has a sliding window) and the uint8 custom mask, each ``tokens x context``."""
    wrappers = 2 if spec.sliding_window else 1
    indices = flashinfer_kv_indices_layout(tokens, context_len, page_size)
    mask = flashinfer_custom_mask_layout(tokens, context_len)
    return [
        Allocation(
            indices.name,
            wrappers * indices.reserved_bytes,
            f"{wrappers} wrapper(s) x {tokens} x {context_len} x 4 B (int32)",
            _FLASHINFER_UPSTREAM,
            lazy=indices,
            copies=wrappers,
        ),
        Allocation(
            mask.name,
            mask.reserved_bytes,
            f"{tokens} x {context_len} x 1 B (uint8)",
            _FLASHINFER_UPSTREAM,
            lazy=mask,
        ),
    ]


def _fa3_allocations(
    spec: ModelSpec, max_bs: int, context_len: int, page_size: int, draft: int, topk: int
) -> list[Allocation]:
    """fa3: its page tables, with EAGLE top-k > 1 the per-position tables, its strided
    indices, and for Llama-4's chunked local attention the local-attention buffers."""
    out = [_fa3_page_tables(spec, max_bs, context_len, page_size, draft)]
    if draft and topk > 1:
        out += _fa3_topk_tables(spec, max_bs, draft, context_len)
    out.append(_fa3_strided_indices(context_len, page_size, draft))
    if spec.architecture in LLAMA4_ARCHS and spec.sliding_window:
        out += _fa3_local_attention(max_bs, context_len, spec.sliding_window, page_size)
    return out


def _fa3_page_tables(
    spec: ModelSpec, max_bs: int, context_len: int, page_size: int, draft: int
) -> Allocation:
    """fa3's ``max_bs x pages`` int32 page tables: the decode one (+ its SWA twin on a hybrid
    model), and with speculative decoding the draft-decode, target-verify and draft-extend
    ones (+ their SWA twins)."""
    tables = 1 + (1 if spec.is_hybrid_swa else 0)
    if draft:
        tables += 3 + (2 if spec.is_hybrid_swa else 0)
    layout = fa3_page_table_layout(max_bs, context_len, page_size)
    return Allocation(
        "fa3 page tables",
        tables * layout.reserved_bytes,
        f"{tables} table(s) x {max_bs} x {layout.items} pages x 4 B (int32)",
        _FA3_UPSTREAM,
        lazy=layout,
        copies=tables,
    )


def _fa3_strided_indices(context_len: int, page_size: int, draft: int) -> Allocation:
    """fa3's int64 strided indices of one entry per page: one buffer, three with speculative
    decoding; allocated at upstream's size in segmented mode too (not lazy)."""
    pages = -(-context_len // page_size)
    strided = (1 + (2 if draft else 0)) * pages * 8
    return Allocation(
        "fa3 strided_indices", strided, f"{pages} pages x 8 B (int64) each", _FA3_UPSTREAM
    )


def _fa3_local_attention(
    max_bs: int, context_len: int, chunk: int, page_size: int
) -> list[Allocation]:
    """fa3's local-attention buffers for Llama-4's chunked attention, of ``max_bs x
    ceil(context / chunk)`` virtual batches. Reserved past one chunk only: within one they
    have max_bs rows, a shape other fa3 buffers share, and are small."""
    return [
        Allocation(
            local.name,
            local.reserved_bytes,
            f"{local.rows:,} x {local.items} x 4 B (int32): {max_bs} x "
            f"ceil({context_len:,} / {chunk:,}) virtual batches",
            _LOCAL_ATTENTION_UPSTREAM,
            lazy=local if context_len > chunk else None,
        )
        for local in fa3_local_attention_layouts(max_bs, context_len, chunk, page_size)
    ]


def _draft_allocations(
    target: list[Allocation], backend: str, max_bs: int, topk: int, steps: int, context_len: int
) -> list[Allocation]:
    """The draft worker's multi-step backend: triton and flashinfer share one
    ``(steps, max_bs x topk x context)`` index buffer across their step backends; fa3 builds
    ``steps - 1`` backends, each allocating what the target's does but the verify mask."""
    if backend == "triton":
        layout = triton_draft_kv_indices_layout(steps, max_bs, topk, context_len)
        where = "layers/attention/triton_backend.py TritonMultiStepDraftBackend"
    elif backend == "flashinfer":
        layout = flashinfer_draft_kv_indices_layout(steps, max_bs, topk, context_len)
        where = "layers/attention/flashinfer_backend.py FlashInferMultiStepDraftBackend"
    elif backend == "fa3":
        return [
            Allocation(
                f"draft {a.name}",
                (steps - 1) * a.bytes,
                f"{steps - 1} draft step backend(s) x ({a.formula})",
                "layers/attention/flashattention_backend.py FlashAttentionMultiStepBackend",
                lazy=a.lazy,
                copies=(steps - 1) * a.copies,
            )
            for a in target
            if a.name != VERIFY_MASK
        ]
    else:
        return []
    shape = f"{steps} x {max_bs} x {topk} x {context_len} x {layout.item_bytes} B"
    return [Allocation(layout.name, layout.reserved_bytes, shape, where, lazy=layout)]


def _fa3_topk_tables(
    spec: ModelSpec, max_bs: int, draft: int, context_len: int
) -> list[Allocation]:
    """fa3 with EAGLE top-k > 1: the draft-decode and target-verify tables of one column per
    position, the verify mask (read only with top-k > 1), and with a sliding window the
    per-draft-token verify table."""
    by_position = fa3_page_table_layout(max_bs, context_len, 1)
    out = [
        Allocation(
            "fa3 top-k page tables",
            2 * by_position.reserved_bytes,
            f"2 table(s) x {max_bs} x {context_len} positions x 4 B (int32)",
            _FA3_UPSTREAM,
            lazy=by_position,
            copies=2,
        ),
        _verify_mask(max_bs, draft, context_len, "flashattention_backend.py"),
    ]
    if spec.is_hybrid_swa:  # allocated whatever the page size (used only at page 1)
        swa_spec = fa3_swa_spec_page_table_layout(max_bs, draft, context_len)
        out.append(
            Allocation(
                swa_spec.name,
                swa_spec.reserved_bytes,
                f"{max_bs} x {draft} x ({context_len} + {draft}) x 4 B (int32)",
                _FA3_UPSTREAM,
                lazy=swa_spec,
            )
        )
    return out


def _verify_mask(max_bs: int, draft: int, context_len: int, where: str) -> Allocation:
    """FULL_MASK verify buffer; mirrors layers/attention/verify_mask.py tree_mask_numel."""
    layout = verify_mask_layout(max_bs, draft, context_len)
    return Allocation(
        VERIFY_MASK,
        layout.reserved_bytes,
        f"{max_bs} x {draft} x ({context_len} + {draft}) x 1 B",
        f"layers/attention/verify_mask.py maybe_create_verify_mask (via {where})",
        lazy=layout,
    )


def lazy_graph_buffer_figures(
    allocations: list[Allocation], captured_bs: int, context_len: int, tokens_per_row: int = 1
) -> list[dict[str, Any]]:
    """Reserved bytes of each lazy cuda-graph buffer, and what it commits at capture and for
    one request of ``context_len`` tokens: the same arithmetic the hooks commit by."""
    whole_context = GraphBatch(1, context_len, context_len, max(1, tokens_per_row))
    capture = capture_batch(captured_bs, tokens_per_row)
    return [
        {
            "name": a.name,
            "reserved_bytes": a.bytes,
            "capture_commit_bytes": a.segmented_commit_bytes(capture),
            "one_full_context_request_commit_bytes": a.segmented_commit_bytes(whole_context),
        }
        for a in allocations
        if a.lazy is not None
    ]
