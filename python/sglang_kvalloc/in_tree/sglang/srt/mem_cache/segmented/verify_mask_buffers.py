"""Segmented mode on a GPU: the speculative verify mask, written by the draft stage.

The draft stage writes the verify mask (triton's and fa3's FULL_MASK) in place, before
the verify step reaches `can_run_graph`, so it is committed where the draft writes it
(`build_eagle_verify_input`, `_build_trivial_verify_input`). If it cannot be, the draft
builds its own mask, as upstream does for a batch past the captured size, and the verify
step commits again or runs eager (`attention_graph_buffers.graph_gate`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import msgspec

from sglang.srt.mem_cache.segmented.graph_layouts import GraphBatch
from sglang.srt.mem_cache.segmented.runtime import RUNTIME

if TYPE_CHECKING:
    from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
    from sglang.srt.managers.schedule_batch import ScheduleBatch
    from sglang.srt.speculative.eagle_info import EagleVerifyInput
    from sglang.srt.speculative.eagle_worker_v2 import EAGLEWorkerV2

logger = logging.getLogger(__name__)


def _draft_batch(batch: ScheduleBatch, tokens_per_row: int, context: int) -> GraphBatch:
    """What the draft stage writes into the verify mask for ``batch`` (its own rows, not
    the padded ones): the host's sequence lengths where the batch has them, else its
    sum, else the context per row (more than needed, never less)."""
    rows = int(batch.seq_lens.shape[0])
    seq_lens_cpu = getattr(batch, "seq_lens_cpu", None)
    if seq_lens_cpu is not None and len(seq_lens_cpu) >= rows:
        lens = seq_lens_cpu[:rows]
        total, longest = int(lens.sum()), int(lens.max()) if rows else 0
    elif getattr(batch, "seq_lens_sum", None) is not None:
        total, longest = int(batch.seq_lens_sum), context
    else:
        total, longest = rows * context, context
    return GraphBatch(rows, total, longest, max(1, tokens_per_row))


@contextlib.contextmanager
def _verify_mask_written(
    backend: AttentionBackend, batch: ScheduleBatch, tokens_per_row: int
) -> Iterator[None]:
    """While the draft stage writes the verify mask in place: commit what it writes
    first. If that cannot be committed, the backend shows a mask that fits no batch for
    the while, so the draft builds its own (upstream's path past the captured size) and
    writes nothing into uncommitted memory."""
    mask = getattr(backend, "_verify_mask", None)
    rows = (
        int(batch.seq_lens.shape[0])
        if getattr(batch, "seq_lens", None) is not None
        else 0
    )
    graph = RUNTIME.graph
    lazy = graph.verify_masks.get(mask.buffer.data_ptr()) if mask is not None else None
    if lazy is None or rows == 0 or not mask.fits(rows):
        yield
        return
    try:
        lazy.ensure(_draft_batch(batch, tokens_per_row, int(backend.max_context_len)))
    except MemoryError as exc:
        graph.draft_mask_fallbacks += 1
        if (
            graph.draft_mask_fallbacks in (1, 10, 100)
            or graph.draft_mask_fallbacks % 1000 == 0
        ):
            logger.warning(
                "The speculative verify mask could not be committed for a batch of %d (%s); "
                "the draft builds its own mask (%d such batches so far).",
                rows,
                str(exc) or "out of device memory",
                graph.draft_mask_fallbacks,
            )
        backend._verify_mask = msgspec.structs.replace(mask, max_bs=0)
        try:
            yield
        finally:
            backend._verify_mask = mask
        return
    yield


def around_build_eagle_verify_input(
    original: Callable[..., EagleVerifyInput],
    batch: ScheduleBatch,
    *args: Any,
    **kwargs: Any,
) -> EagleVerifyInput:
    """Wraps `eagle_worker_common.build_eagle_verify_input` (`@kvalloc_hook`): the draft
    stage's tail writes the verify mask into the target backend's buffer, committed
    first."""
    backend = kwargs["target_worker"].model_runner.attn_backend
    with _verify_mask_written(backend, batch, int(kwargs["num_draft_tokens"])):
        return original(batch, *args, **kwargs)


def around_build_trivial_verify_input(
    original: Callable[..., EagleVerifyInput],
    worker: EAGLEWorkerV2,
    batch: ScheduleBatch,
    *args: Any,
    **kwargs: Any,
) -> EagleVerifyInput:
    """Wraps `EAGLEWorkerV2._build_trivial_verify_input` (`@kvalloc_hook`): with zero
    draft steps the mask is filled with True, one token per request, committed first."""
    backend = worker._target_worker.model_runner.attn_backend
    with _verify_mask_written(backend, batch, 1):
        return original(worker, batch, *args, **kwargs)
