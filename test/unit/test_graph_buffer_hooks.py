"""The cuda-graph buffer hooks (issue 9) on upstream's own state builders, over the fake CUDA
driver: upstream's `TritonAttnBackend.init_cuda_graph_state` and
`FlashAttentionBackend.init_cuda_graph_state` run on small shapes; the context-sized buffers
come back reserved with the planner's layout, everything else is upstream's; the runner gate
commits before a replay and sends a batch it cannot commit to the eager path."""

from __future__ import annotations

import types

import pytest
import torch
from fake_cuda import MIB, FakeDriver, FakeVmmApi

from sglang_kvalloc import modes
from sglang_kvalloc.core import planner
from sglang_kvalloc.core.cuda_backing import CudaBackingFactory, VmmDevice
from sglang_kvalloc.core.graph_buffers import GraphBatch
from sglang_kvalloc.upstream import graph_buffers
from sglang_kvalloc.upstream.segmented import SETTINGS
from sglang_kvalloc.upstream.state import STATE

G = 2 * MIB


@pytest.fixture
def segmented_on_fake_gpu():
    driver = FakeDriver(capacity=512 * MIB)
    factory = CudaBackingFactory(VmmDevice(FakeVmmApi(driver), 0, background_refill=False))
    saved = STATE.mode, SETTINGS.backings
    STATE.mode, SETTINGS.backings = modes.SEGMENTED, factory
    graph_buffers.BUFFERS.clear()
    graph_buffers.STATS.eager_fallbacks = 0
    yield driver
    for buffer in graph_buffers.BUFFERS:
        buffer.release()
    graph_buffers.BUFFERS.clear()
    STATE.mode, SETTINGS.backings = saved


def triton_stub(context: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        dllm_attention=None, num_head=4, max_kv_splits=2, v_head_dim=16, swa_v_head_dim=None,
        device="cpu", lean_total_programs=2, lean_block_m=4, is_draft_runner=False,
        skip_prefill=False, num_draft_tokens=None, sliding_window_size=None,
        use_sliding_window_kv_pool=False, max_context_len=context,
    )  # fmt: skip


def test_triton_kv_indices_is_reserved_and_the_rest_is_upstreams(segmented_on_fake_gpu) -> None:
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    context, max_bs = 10_000_000, 16
    backend = triton_stub(context)
    graph_buffers.around_triton_init_cuda_graph_state(
        TritonAttnBackend.init_cuda_graph_state, backend, max_bs, max_bs
    )
    (buffer,) = graph_buffers.BUFFERS
    assert buffer.layout == planner.triton_kv_indices_layout(max_bs, context)
    kv = backend.cuda_graph_kv_indices
    assert kv.shape == (max_bs * context,) and kv.dtype == torch.int64  # 1.28 GB, reserved
    # Only the first granule is committed (upstream may poke element 0 at set-up).
    assert buffer.committed_bytes == G and int(kv[::1_000_000].count_nonzero()) == 0
    # Everything else is upstream's ordinary allocation at its own shape.
    assert backend.cuda_graph_attn_logits.shape == (max_bs, 4, 2, 16)
    assert backend.cuda_graph_num_kv_splits.shape == (max_bs,)
    # Static mode (or a caller's buffer) leaves upstream alone.
    STATE.mode = modes.STATIC
    other = triton_stub(1000)
    graph_buffers.around_triton_init_cuda_graph_state(
        TritonAttnBackend.init_cuda_graph_state, other, 4, 4
    )
    assert len(graph_buffers.BUFFERS) == 1 and other.cuda_graph_kv_indices.numel() == 4000


def test_fa3_page_tables_are_reserved_rows(segmented_on_fake_gpu) -> None:
    from sglang.srt.layers.attention.flashattention_backend import FlashAttentionBackend

    context, max_bs, page = 1_000_000, 8, 16
    backend = types.SimpleNamespace(
        max_context_len=context, page_size=page, device="cpu", _get_scheduler_metadata=None,
        use_mla=False, local_attn_builder=None, use_sliding_window_kv_pool=True, topk=1,
        speculative_num_draft_tokens=None, is_encoder_decoder=False,
    )  # fmt: skip
    graph_buffers.around_fa3_init_cuda_graph_state(
        FlashAttentionBackend.init_cuda_graph_state, backend, max_bs, max_bs
    )
    layout = planner.fa3_page_table_layout(max_bs, context, page)
    assert [b.layout for b in graph_buffers.BUFFERS] == [layout, layout]  # page + SWA tables
    meta = backend.decode_cuda_graph_metadata
    assert meta["page_table"].shape == meta["swa_page_table"].shape == (max_bs, 62_500)
    assert meta["cache_seqlens"].shape == (max_bs,)  # upstream's own
    # The planner states what a batch commits; the gate commits exactly that per table.
    runner = types.SimpleNamespace(capture_bs=[1, 2, 4, 8], seq_len_fill_value=1)
    batch = types.SimpleNamespace(
        batch_size=3, seq_lens_cpu=torch.tensor([10, 600_000, 5]), seq_lens=None
    )
    assert graph_buffers.around_can_run_graph(lambda r, b: True, runner, batch) is True
    expected = graph_buffers.graph_batch(runner, batch)
    assert expected == GraphBatch(rows=4, seq_lens_sum=600_016, max_seq_len=600_000)
    for buffer in graph_buffers.BUFFERS:
        assert buffer.committed_bytes == layout.commit_bytes(expected, G)
    assert graph_buffers.release_at_idle() == 2 * layout.commit_bytes(expected, G)


def test_a_batch_whose_buffers_cannot_be_committed_runs_eager(segmented_on_fake_gpu) -> None:
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    driver = segmented_on_fake_gpu
    backend = triton_stub(20_000_000)
    graph_buffers.around_triton_init_cuda_graph_state(
        TritonAttnBackend.init_cuda_graph_state, backend, 8, 8
    )
    runner = types.SimpleNamespace(capture_bs=[8], seq_len_fill_value=1, max_bs=8)
    graph_buffers.before_capture(runner)  # capture's fill is committed before it writes
    assert graph_buffers.BUFFERS[0].committed_bytes == G
    huge = types.SimpleNamespace(batch_size=8, seq_lens_cpu=torch.full((8,), 19_000_000))
    assert graph_buffers.around_can_run_graph(lambda r, b: True, runner, huge) is False
    assert graph_buffers.STATS.eager_fallbacks == 1  # 1.2 GB of indices: over the 512 MiB
    assert graph_buffers.BUFFERS[0].committed_bytes == 0  # back to nothing, as on every rank
    small = types.SimpleNamespace(batch_size=5, seq_lens_cpu=torch.full((5,), 100_000))
    assert graph_buffers.around_can_run_graph(lambda r, b: True, runner, small) is True
    assert graph_buffers.around_can_run_graph(lambda r, b: False, runner, huge) is False
    assert graph_buffers.STATS.eager_fallbacks == 1  # upstream said no: not our fallback
    assert driver.physical_bytes > G
    assert graph_buffers.stats()["cuda_graph_eager_fallbacks"] == 1


def test_flashinfer_wrappers_and_mask_are_reserved_without_a_full_size_clone(
    segmented_on_fake_gpu,
) -> None:
    from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend

    driver = segmented_on_fake_gpu
    context, max_bs = 10_000_000, 8
    backend = types.SimpleNamespace(
        max_context_len=context, page_size=1, num_wrappers=2, use_sliding_window_kv_pool=False,
        skip_prefill=False, kv_indptr=[torch.zeros(max_bs + 1, dtype=torch.int32)] * 2,
    )  # fmt: skip
    graph_buffers.around_flashinfer_init_cuda_graph_state(
        FlashInferAttnBackend.init_cuda_graph_state, backend, max_bs, max_bs
    )
    assert backend.num_wrappers == 2
    indices = planner.flashinfer_kv_indices_layout(max_bs, context, 1)
    mask = planner.flashinfer_custom_mask_layout(max_bs, context)
    assert sorted(b.layout.name for b in graph_buffers.BUFFERS) == sorted(
        [indices.name, indices.name, mask.name]
    )
    assert [x.shape for x in backend.cuda_graph_kv_indices] == [(max_bs * context,)] * 2
    assert backend.cuda_graph_custom_mask.shape == (max_bs * context,)
    # 640 MB of indices per wrapper and 80 MB of mask reserved; one granule each committed.
    assert driver.physical_bytes <= 4 * G
    # A verify batch: the mask commits per query token, the indices per position.
    batch = GraphBatch(rows=8, seq_lens_sum=800_000, max_seq_len=100_000, tokens_per_row=4)
    graph_buffers.ensure_for(batch)
    by_name = {b.layout.name: b for b in graph_buffers.BUFFERS}
    assert by_name[mask.name].committed_bytes == mask.commit_bytes(batch, G)
    assert mask.items_needed(batch) == (800_000 + 8 * 5) * 4


def test_ranks_agree_on_eager_and_all_go_back_to_nothing(segmented_on_fake_gpu, monkeypatch):
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    backend = triton_stub(1_000_000)
    graph_buffers.around_triton_init_cuda_graph_state(
        TritonAttnBackend.init_cuda_graph_state, backend, 8, 8
    )
    runner = types.SimpleNamespace(capture_bs=[8], seq_len_fill_value=1, max_bs=8)
    votes = []

    def another_rank_failed(value: int) -> int:
        votes.append(value)
        return 0

    monkeypatch.setattr(SETTINGS, "agree", another_rank_failed)
    batch = types.SimpleNamespace(batch_size=8, seq_lens_cpu=torch.full((8,), 100_000))
    assert graph_buffers.around_can_run_graph(lambda r, b: True, runner, batch) is False
    assert votes == [1]  # this rank could commit; another could not
    assert graph_buffers.BUFFERS[0].committed_bytes == 0
    # A batch that needs nothing new does not call the agreement at all.
    monkeypatch.setattr(SETTINGS, "agree", lambda value: value)
    assert graph_buffers.around_can_run_graph(lambda r, b: True, runner, batch) is True
    votes.clear()
    monkeypatch.setattr(SETTINGS, "agree", another_rank_failed)
    assert graph_buffers.around_can_run_graph(lambda r, b: True, runner, batch) is True
    assert votes == []
