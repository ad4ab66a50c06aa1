"""Segmented mode on a GPU: the attention backends' context-sized cuda-graph buffers.

Upstream allocates them once, at capture, by max batch x context (`torch.zeros` in each
backend's `init_cuda_graph_state`). Here, while the backend builds its graph state,
those `torch.zeros` calls whose shape and dtype are the layout (`graph_layouts`) of a
context-sized buffer get a reserved tensor instead (`LazyGraphBuffer`; uncommitted
memory reads zeros, as `torch.zeros` would). Everything else the backend allocates is
upstream's own.

Before a graph runs, `can_run_graph` commits what the batch writes (known on the host:
rows, sum and maximum of the sequence lengths); if the device cannot, the batch runs
eager, as upstream runs a batch the graphs do not cover. Committed ranges go back at
idle.

Covered: triton's `cuda_graph_kv_indices`, fa3's page tables (every (max_bs, pages)
int32 table, speculative ones included), flashinfer's per-wrapper
`cuda_graph_kv_indices` and its custom mask, and the speculative verify mask of triton
and fa3 (FULL_MASK), which the draft stage commits where it writes it
(`verify_mask_buffers`). The speculative runners that override `can_run_graph`
(`capture` is inherited) are gated the same way; a draft-decode runner commits for its
branches and steps (triton's multi-step draft `kv_indices`, the per-step backends'
tables), and Llama-4's chunked local-attention tables under fa3 (one row per request and
chunk its query tokens reach). Not covered, allocated at upstream's size:
flashinfer-MLA's index buffer, fa3's `strided_indices` (an arange of 8 B per page, by
context alone, not by batch), the prefill cuda-graph runner's buffers.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import torch

from sglang.srt.mem_cache.segmented.backing import BackingFactory
from sglang.srt.mem_cache.segmented.cuda_backing import CudaBackingFactory
from sglang.srt.mem_cache.segmented.graph_buffers import LazyGraphBuffer
from sglang.srt.mem_cache.segmented.graph_layouts import (
    CHUNK_ROWS,
    VERIFY_MASK,
    GraphBatch,
    GraphBufferLayout,
    draft_graph_batch,
    fa3_local_attention_layouts,
    fa3_page_table_layout,
    fa3_swa_spec_page_table_layout,
    flashinfer_custom_mask_layout,
    flashinfer_draft_kv_indices_layout,
    flashinfer_kv_indices_layout,
    triton_draft_kv_indices_layout,
    triton_kv_indices_layout,
    verify_mask_layout,
)
from sglang.srt.mem_cache.segmented.runtime import RUNTIME

if TYPE_CHECKING:
    from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
    from sglang.srt.layers.attention.flashattention_backend import (
        FlashAttentionBackend,
        FlashAttentionMetadata,
    )
    from sglang.srt.layers.attention.flashinfer_backend import (
        FlashInferAttnBackend,
        FlashInferMultiStepDraftBackend,
    )
    from sglang.srt.layers.attention.local_attention import (
        LocalAttentionMetadataBuilder,
    )
    from sglang.srt.layers.attention.triton_backend import (
        TritonAttnBackend,
        TritonMultiStepDraftBackend,
    )
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch
    from sglang.srt.model_executor.runner.decode_cuda_graph_runner import (
        DecodeCudaGraphRunner,
    )

logger = logging.getLogger(__name__)


def _backings() -> CudaBackingFactory | None:
    """The CUDA backing factory when segmented mode commits explicitly (a GPU), else None."""
    if not RUNTIME.decision.explicit_commits:
        return None
    return cast(CudaBackingFactory, RUNTIME.backings)


def _shape_of(size: tuple[Any, ...]) -> tuple[int, ...]:
    if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
        return tuple(int(s) for s in size[0])
    return tuple(int(s) for s in size)


def new_buffer(layout: GraphBufferLayout, backings: BackingFactory) -> LazyGraphBuffer:
    """A reserved buffer with its first item committed: upstream pokes element 0 of some
    of them at set-up (flashinfer), and a write to an uncommitted range would reach the
    shared scratch granule."""
    buffer = LazyGraphBuffer(layout, backings(layout.reserved_bytes))
    buffer.ensure(GraphBatch(1, 1, 1))
    return buffer


@contextlib.contextmanager
def reserved_zeros(
    expected: dict[tuple[tuple[int, ...], torch.dtype], GraphBufferLayout],
    backings: BackingFactory,
) -> Iterator[list[LazyGraphBuffer]]:
    """While active, `torch.zeros` of exactly an expected (shape, dtype) returns a
    reserved, uncommitted tensor of a new `LazyGraphBuffer` (listed in the yielded
    list)."""
    made: list[LazyGraphBuffer] = []
    real_zeros = torch.zeros

    def zeros(*size: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("out") is None and size:
            try:
                shape = _shape_of(size)
            except (TypeError, ValueError):
                shape = ()
            dtype = kwargs.get("dtype") or torch.get_default_dtype()
            layout = expected.get((shape, dtype))
            if layout is not None:
                buffer = new_buffer(layout, backings)
                made.append(buffer)
                tensor = buffer.backing.tensor(dtype, shape)
                if layout.name == VERIFY_MASK:
                    RUNTIME.graph.verify_masks[tensor.data_ptr()] = buffer
                elif layout.kind == CHUNK_ROWS:
                    RUNTIME.graph.local_tables[tensor.data_ptr()] = buffer
                return tensor
        return real_zeros(*size, **kwargs)

    torch.zeros = zeros
    try:
        yield made
    finally:
        torch.zeros = real_zeros


def _register(
    backend: str, made: list[LazyGraphBuffer], expected_names: set[str]
) -> None:
    RUNTIME.graph.buffers.extend(made)
    missing = expected_names - {b.layout.name for b in made}
    if missing:
        # Upstream allocated it another way (a newer version?): it is at upstream's size.
        logger.warning(
            "--kv-alloc-mode segmented: %s cuda-graph buffer(s) %s were not found where "
            "expected; they are allocated at upstream's size.",
            backend,
            ", ".join(sorted(missing)),
        )
    for buffer in made:
        logger.info(
            "Segmented cuda-graph buffer %s (%s): %d x %d x %d B reserved (%.2f GB), %.1f MB "
            "committed; committed per replay as far as the batch writes, released at idle.",
            buffer.layout.name,
            backend,
            buffer.layout.rows,
            buffer.layout.items,
            buffer.layout.item_bytes,
            buffer.layout.reserved_bytes / 1e9,
            buffer.committed_bytes / 1e6,
        )


def around_triton_init_cuda_graph_state(
    original: Callable[..., None],
    backend: TritonAttnBackend,
    max_bs: int,
    max_num_tokens: int,
    kv_indices_buf: torch.Tensor | None = None,
    *args: Any,
    **kwargs: Any,
) -> None:
    """Wraps `TritonAttnBackend.init_cuda_graph_state` (`@kvalloc_hook`):
    `cuda_graph_kv_indices` reserved."""
    backings = _backings()
    if (
        backings is None or kv_indices_buf is not None
    ):  # a caller's buffer stays the caller's
        return original(
            backend, max_bs, max_num_tokens, kv_indices_buf, *args, **kwargs
        )
    context = int(backend.max_context_len)
    layout = triton_kv_indices_layout(max_num_tokens, context)
    expected = {((layout.items,), torch.int64): layout}
    names = {layout.name}
    mask = _expected_verify_mask(backend, max_bs, context, is_read=True)
    if mask is not None:  # triton reads it as uint8
        expected[((mask.items,), torch.uint8)] = mask
        names.add(mask.name)
    with reserved_zeros(expected, backings) as made:
        result = original(
            backend, max_bs, max_num_tokens, kv_indices_buf, *args, **kwargs
        )
    _register("triton", made, names)
    return result


def _expected_verify_mask(
    backend: AttentionBackend, max_bs: int, context: int, *, is_read: bool
) -> GraphBufferLayout | None:
    """The verify mask's layout where upstream's `maybe_create_verify_mask` will
    allocate a context-sized one (a target runner, speculative, FULL_MASK); None where
    it allocates nothing or a QLEN_ONLY mask (draft x draft per request: not
    context-sized)."""
    draft = getattr(backend, "num_draft_tokens", None)
    if draft is None:  # fa3 names it differently
        draft = getattr(backend, "speculative_num_draft_tokens", None)
    if not draft or not is_read:
        return None
    if getattr(backend, "is_draft_runner", False) or getattr(
        backend, "skip_prefill", False
    ):
        return None
    from sglang.srt.speculative.eagle_utils import TreeMaskMode, default_tree_mask_mode

    if default_tree_mask_mode() != TreeMaskMode.FULL_MASK:
        return None
    return verify_mask_layout(max_bs, int(draft), context)


def around_triton_draft_init_cuda_graph_state(
    original: Callable[..., None],
    backend: TritonMultiStepDraftBackend,
    max_bs: int,
    max_num_tokens: int,
) -> None:
    """Wraps `TritonMultiStepDraftBackend.init_cuda_graph_state` (`@kvalloc_hook`): the
    draft steps' shared `cuda_graph_kv_indices` (steps x max_bs x topk x context, int64)
    reserved; each step's backend gets its row as its caller's buffer, which the triton
    hook leaves alone."""
    return _draft_init(
        original, backend, max_bs, max_num_tokens, triton_draft_kv_indices_layout
    )


def around_flashinfer_draft_init_cuda_graph_state(
    original: Callable[..., None],
    backend: FlashInferMultiStepDraftBackend,
    max_bs: int,
    max_num_tokens: int,
) -> None:
    """Wraps `FlashInferMultiStepDraftBackend.init_cuda_graph_state` (`@kvalloc_hook`):
    as triton's, int32."""
    return _draft_init(
        original, backend, max_bs, max_num_tokens, flashinfer_draft_kv_indices_layout
    )


def _draft_init(
    original: Callable[..., None],
    backend: TritonMultiStepDraftBackend | FlashInferMultiStepDraftBackend,
    max_bs: int,
    max_num_tokens: int,
    layout_of: Callable[[int, int, int, int], GraphBufferLayout],
) -> None:
    backings = _backings()
    if backings is None:
        return original(backend, max_bs, max_num_tokens)
    steps = int(backend.speculative_num_steps)
    topk = max(1, int(getattr(backend, "topk", 1) or 1))
    layout = layout_of(steps, max_bs, topk, int(backend.max_context_len))
    dtype = {8: torch.int64, 4: torch.int32}[layout.item_bytes]
    with reserved_zeros(
        {((layout.rows, layout.items), dtype): layout}, backings
    ) as made:
        result = original(backend, max_bs, max_num_tokens)
    _register(layout.name.removesuffix(" cuda_graph_kv_indices"), made, {layout.name})
    return result


def around_fa3_init_cuda_graph_state(
    original: Callable[..., None],
    backend: FlashAttentionBackend,
    max_bs: int,
    max_num_tokens: int,
) -> None:
    """Wraps `FlashAttentionBackend.init_cuda_graph_state` (`@kvalloc_hook`): every page
    table reserved, and Llama-4's local-attention tables."""
    backings = _backings()
    if backings is None:
        return original(backend, max_bs, max_num_tokens)
    context = int(backend.max_context_len)
    layout = fa3_page_table_layout(max_bs, context, int(backend.page_size))
    expected = {((layout.rows, layout.items), torch.int32): layout}
    if int(getattr(backend, "topk", 0) or 0) > 1 and layout.positions_per_item != 1:
        # The top-k draft table is (max_bs, max_context_len): one column per position.
        by_position = fa3_page_table_layout(max_bs, context, 1)
        expected[((by_position.rows, by_position.items), torch.int32)] = by_position
    names = {layout.name}
    # fa3 reads the mask only with top-k > 1 (else QLEN_ONLY); allocated as bool.
    topk = int(getattr(backend, "topk", 0) or 0)
    mask = _expected_verify_mask(backend, max_bs, context, is_read=topk > 1)
    if mask is not None:
        expected[((mask.items,), torch.bool)] = mask
        names.add(mask.name)
    draft = int(getattr(backend, "speculative_num_draft_tokens", 0) or 0)
    if topk > 1 and draft and getattr(backend, "has_swa", False):
        swa_spec = fa3_swa_spec_page_table_layout(max_bs, draft, context)
        expected[((swa_spec.rows, swa_spec.items), torch.int32)] = swa_spec
        names.add(swa_spec.name)
    builder = getattr(backend, "local_attn_builder", None)
    if builder is not None:
        # Llama-4's chunked local attention: its virtual-batch tables, past one chunk.
        chunk = int(builder.attention_chunk_size)
        if context > chunk:
            page = int(getattr(builder, "page_size", 0) or 1)
            table, *vectors = fa3_local_attention_layouts(max_bs, context, chunk, page)
            expected[((table.rows, table.items), torch.int32)] = table
            for vector in vectors:
                expected[((vector.rows,), torch.int32)] = vector
            names |= {table.name, *(vector.name for vector in vectors)}
    with reserved_zeros(expected, backings) as made:
        result = original(backend, max_bs, max_num_tokens)
    _register("fa3", made, names)
    return result


def around_flashinfer_init_cuda_graph_state(
    original: Callable[..., None],
    backend: FlashInferAttnBackend,
    max_bs: int,
    max_num_tokens: int,
    kv_indices_buf: torch.Tensor | None = None,
    *args: Any,
    **kwargs: Any,
) -> None:
    """Wraps `FlashInferAttnBackend.init_cuda_graph_state` (`@kvalloc_hook`): each
    wrapper's `cuda_graph_kv_indices` and the custom mask reserved. Upstream clones the
    first index buffer for the other wrappers (a sliding window has two); a clone would
    allocate the whole size, so upstream builds one and the others are reserved here."""
    backings = _backings()
    if backings is None or kv_indices_buf is not None:
        return original(
            backend, max_bs, max_num_tokens, kv_indices_buf, *args, **kwargs
        )
    context = int(backend.max_context_len)
    page = int(getattr(backend, "page_size", 1) or 1)
    indices = flashinfer_kv_indices_layout(max_num_tokens, context, page)
    mask = flashinfer_custom_mask_layout(max_num_tokens, context)
    expected = {
        ((indices.items,), torch.int32): indices,
        ((mask.items,), torch.uint8): mask,
    }
    wrappers = int(backend.num_wrappers)
    backend.num_wrappers = 1
    try:
        with reserved_zeros(expected, backings) as made:
            result = original(
                backend, max_bs, max_num_tokens, kv_indices_buf, *args, **kwargs
            )
    finally:
        backend.num_wrappers = wrappers
    for _ in range(wrappers - 1):
        buffer = new_buffer(indices, backings)
        made.append(buffer)
        backend.cuda_graph_kv_indices.append(
            buffer.backing.tensor(torch.int32, (indices.items,))
        )
    names = {indices.name} | (
        {mask.name} if not getattr(backend, "skip_prefill", False) else set()
    )
    _register("flashinfer", made, names)
    return result


def _draft_shape(runner: DecodeCudaGraphRunner) -> tuple[int, int] | None:
    """(topk, steps) of an EAGLE draft-decode runner, whose replay fills topk branches
    per request over its steps; None for the target's decode runner."""
    if getattr(runner, "draft_attn_backend", None) is None:
        return None
    return int(getattr(runner, "topk", 1) or 1), int(
        getattr(runner, "speculative_num_steps", 1)
    )


def graph_batch(
    runner: DecodeCudaGraphRunner, forward_batch: ForwardBatch
) -> GraphBatch:
    """What a replay of ``forward_batch`` fills: padded to the captured batch size,
    padding rows at upstream's seq_len_fill_value (a draft runner: its branches and
    steps too)."""
    bs = int(forward_batch.batch_size)
    capture_bs = getattr(runner, "capture_bs", None) or [bs]  # upstream keeps it sorted
    at = bisect.bisect_left(capture_bs, bs)
    rows = capture_bs[at] if at < len(capture_bs) else bs
    fill = int(getattr(runner, "seq_len_fill_value", 1) or 1)
    seq_lens_cpu = getattr(forward_batch, "seq_lens_cpu", None)
    if seq_lens_cpu is not None:
        lens = seq_lens_cpu[:bs]
        seq_sum, longest = int(lens.sum()), int(lens.max()) if bs else 0
    else:
        lens = forward_batch.seq_lens[:bs]
        seq_sum, longest = int(lens.sum().item()), int(lens.max().item()) if bs else 0
    total, longest = seq_sum + (rows - bs) * fill, max(longest, fill)
    draft = _draft_shape(runner)
    if draft is not None:
        return draft_graph_batch(rows, total, longest, *draft)
    tokens_per_row = int(getattr(runner, "captured_req_width", 1) or 1)
    return GraphBatch(rows, total, longest, tokens_per_row)


def ensure_for(batch: GraphBatch) -> None:
    """Commit every lazy buffer for ``batch`` (MemoryError if the device cannot)."""
    RUNTIME.graph.ensure_for(batch)


def graph_gate(
    ok: bool,
    runner: DecodeCudaGraphRunner,
    forward_batch: ForwardBatch,
    *args: Any,
    **kwargs: Any,
) -> bool:
    """Called where `DecodeCudaGraphRunner.can_run_graph` returns, with its answer (and
    the speculative runners', which override it): a batch the graphs can run gets its
    lazy buffers committed first; one that cannot be committed runs eager instead. False
    stays False."""
    graph = RUNTIME.graph
    if not ok or not graph.buffers:
        return ok
    batch = graph_batch(runner, forward_batch)
    if not graph.needs_commit(batch):
        return ok
    # Every attention-TP rank holds the same buffers and sees the same batch, so all of them
    # reach this point in the same step; they agree on graph or eager (a graph on one rank
    # and eager on another would diverge in their collectives).
    reason = ""
    try:
        graph.ensure_for(batch)
    except MemoryError as exc:
        reason = str(exc) or "out of device memory"
    if RUNTIME.settings.agree(int(not reason)) == 0:
        # Every rank goes back to nothing committed, so all of them stay in the same state
        # and keep reaching the agreement together (release synchronizes the device first).
        graph.release_all()
        graph.eager_fallbacks += 1
        if graph.eager_fallbacks in (1, 10, 100) or graph.eager_fallbacks % 1000 == 0:
            logger.warning(
                "Segmented cuda-graph buffers could not be committed for a batch of %d (%s); "
                "it runs without the graph (%d such batches so far).",
                int(forward_batch.batch_size),
                reason or "another rank could not commit",
                graph.eager_fallbacks,
            )
        return False
    return ok


def around_capture(
    original: Callable[..., None],
    runner: DecodeCudaGraphRunner,
    *args: Any,
    **kwargs: Any,
) -> None:
    """Wraps `DecodeCudaGraphRunner.capture` (`@kvalloc_hook`): capture fills every
    captured row at the fill value, so that is committed first (a write to an
    uncommitted range would land on the shared scratch granule); and torch captures in
    its global mode, where driver calls from another thread can invalidate the capture,
    so the spare-handle refill thread waits."""
    if RUNTIME.graph.buffers:
        max_bs = int(getattr(runner, "max_bs", 0) or 0)
        fill = int(getattr(runner, "seq_len_fill_value", 1) or 1)
        width = int(getattr(runner, "captured_req_width", 1) or 1)
        draft = _draft_shape(runner)
        if draft is not None:
            ensure_for(draft_graph_batch(max_bs, max_bs * fill, fill, *draft))
        else:
            ensure_for(GraphBatch(max_bs, max_bs * fill, fill, width))
    paused = getattr(RUNTIME.backings, "refill_paused", None)
    with paused() if paused is not None else contextlib.nullcontext():
        return original(runner, *args, **kwargs)


def around_graph_capture(
    original: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    """Wraps `parallel_state.graph_capture` (`@kvalloc_hook`), the context every
    upstream graph capture runs in (decode, breakable and full prefill, speculative
    draft runners, row buckets): torch captures in its global mode, where another
    thread's driver calls invalidate the capture, so the spare-handle refill thread
    waits until the capture is over."""
    paused = getattr(RUNTIME.backings, "refill_paused", None)
    if paused is None:
        return original(*args, **kwargs)
    return _refill_paused_through(paused(), original(*args, **kwargs))


@contextlib.contextmanager
def _refill_paused_through(
    paused: contextlib.AbstractContextManager[None],
    capture: contextlib.AbstractContextManager[Any],
) -> Iterator[Any]:
    with paused, capture as context:
        yield context


def committed_local_attention_rows(
    builder: LocalAttentionMetadataBuilder,
    metadata: FlashAttentionMetadata,
    bs: int,
    *,
    buffers: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Called first in `LocalAttentionMetadataBuilder.update_for_replay`, for its
    `buffers`: upstream zeroes the whole local-attention table past the batch before
    every decode replay (its cost: gpu.md). Where the tables are reserved, rows past the
    committed ones read zeros already (the scratch granule), so upstream gets views of
    the committed rows: the same values, without the fill over the rest. Upstream's
    buffers otherwise."""
    local_tables = RUNTIME.graph.local_tables
    if not buffers or not local_tables:
        return buffers
    trimmed = {}
    for name, tensor in buffers.items():
        lazy = local_tables.get(tensor.data_ptr())
        rows = lazy.rows_backed() if lazy is not None else tensor.shape[0]
        if rows <= bs:  # not committed for this batch (no gate ran): upstream's own way
            return buffers
        trimmed[name] = tensor[:rows]
    return trimmed


def release_at_idle() -> int:
    """Give back every lazy buffer's committed memory (idle: no graph is running)."""
    return RUNTIME.graph.release_at_idle()
