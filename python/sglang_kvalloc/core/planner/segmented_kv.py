"""Segmented mode's KV pool per GPU (mechanism b): what it reserves, commits at start and
what one request of the planned context commits."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sglang_kvalloc.core.planner.budget import PoolSize, RowRoom
from sglang_kvalloc.core.planner.layouts import GPU_VMM_GRANULARITY
from sglang_kvalloc.core.planner.model import KVPerToken, ModelSpec

try:
    from sglang_kvalloc.in_tree_finder import standalone
except ImportError:  # in upstream's tree (the series): upstream's own module, imported as such
    from sglang.srt.mem_cache.segmented.geometry import choose_segment_tokens
else:

    def choose_segment_tokens(*args: Any, **kwargs: Any) -> Any:
        """The segment-size rule of upstream's module (in_tree/), looked up at each call: the
        upstream-named module once SGLang is loaded, a standalone load of the same file where
        it is not (the planner's CLI runs without torch)."""
        geometry = standalone("sglang.srt.mem_cache.segmented.geometry")
        return geometry.choose_segment_tokens(*args, **kwargs)


@dataclass(frozen=True)
class SegmentedKv:
    """Segmented mode's KV pool (mechanism b) per GPU, and one request of the planned context.

    The pool is reserved at upstream's size; at start one segment of each (sub-)pool is
    committed. One request commits its KV: every token in full-attention (or MLA) layers, and
    in sliding-window layers only the window plus one prefill chunk (the SWA radix cache frees
    older slots). ``headroom_bytes`` is what the device has left, after weights, for the
    request's KV and segmented mode's committed context-scaled allocations: negative means
    it cannot fit at any --mem-fraction-static (activations are not modelled)."""

    pool_kind: str  # "mha", "hybrid_swa" or "mla"
    segment_tokens: int
    committed_at_start_bytes: int
    reserved_bytes: int
    request_context: int
    request_full_tokens: int
    request_swa_tokens: int
    request_kv_bytes: int
    request_fits_pool: bool  # the reserved pool (upstream's sizing) holds it
    headroom_bytes: int
    # What would make upstream's sizing hold it: the largest --swa-full-tokens-ratio (hybrid
    # only) and the smallest --mem-fraction-static; None where no setting can.
    swa_full_tokens_ratio_for_request: float | None
    mem_fraction_static_for_request: float | None
    # On a GPU: what req_to_token rows may commit at run time, the part of it the KV budget
    # keeps free (`req_to_token_room`), and the pool that leaves (the server's token_capacity).
    row_room: RowRoom | None = None
    max_total_num_tokens: int = 0


def _segment_tokens(cap_tokens: int, page_size: int, row_bytes: list[int]) -> int:
    """The default segment size on a GPU (the server's choice without a request)."""
    choice = choose_segment_tokens(None, cap_tokens, page_size, row_bytes, GPU_VMM_GRANULARITY)
    return min(choice.tokens, cap_tokens)


def segmented_kv(
    spec: ModelSpec,
    cell: KVPerToken,
    pool: PoolSize,
    *,
    context_len: int,
    page_size: int,
    chunked_prefill_size: int,
    pre_load_bytes: int,
    weight_bytes: int,
    mm_reservation_bytes: int,
    segmented_committed_bytes: int,
) -> SegmentedKv:
    """The `SegmentedKv` figures (see there) for one configuration."""
    full_cell = cell.full_attention + cell.mla
    hybrid = bool(cell.swa_layers and cell.full_layers)
    kind = "mla" if spec.attention == "mla" else "hybrid_swa" if hybrid else "mha"
    cap_full = pool.max_total_num_tokens + page_size
    start = 0
    seg_full = 0
    for tokens, per_layer, layers in (
        (cap_full, cell.per_layer_full, cell.full_layers),
        (pool.swa_tokens + page_size, cell.per_layer_swa, cell.swa_layers if hybrid else 0),
    ):
        if not layers or tokens <= page_size:
            continue
        # K and V per layer for MHA (half the per-layer bytes each); one latent row for MLA.
        rows = [per_layer] * layers if kind == "mla" else [per_layer // 2] * (2 * layers)
        seg = _segment_tokens(tokens, page_size, rows)
        seg_full = seg_full or seg
        start += seg * sum(rows)
    swa_need = 0
    if hybrid:
        window = spec.sliding_window or context_len
        swa_need = min(context_len, window + chunked_prefill_size + page_size)
    kv = context_len * full_cell + swa_need * cell.sliding_window
    fits_pool = context_len <= pool.max_total_num_tokens and (
        not hybrid or swa_need <= pool.swa_tokens
    )
    headroom = pre_load_bytes - weight_bytes - mm_reservation_bytes - kv - segmented_committed_bytes
    ratio = None
    if hybrid:
        ratio = math.ceil(swa_need / context_len * 1000) / 1000
    # budget = pre_load - weights - pre_load x (1 - mfs) - mm >= kv  (kv_budget_bytes)
    mfs = 1 - (pre_load_bytes - weight_bytes - mm_reservation_bytes - kv) / pre_load_bytes
    mfs_needed = math.ceil(mfs * 1000) / 1000 if mfs <= 1 else None
    return SegmentedKv(
        pool_kind=kind,
        segment_tokens=seg_full,
        committed_at_start_bytes=start,
        reserved_bytes=pool.pool_bytes,
        request_context=context_len,
        request_full_tokens=context_len,
        request_swa_tokens=swa_need,
        request_kv_bytes=kv,
        request_fits_pool=fits_pool,
        headroom_bytes=headroom,
        swa_full_tokens_ratio_for_request=ratio,
        mem_fraction_static_for_request=mfs_needed,
    )
