"""The cuda-graph buffer hooks (issue 9) on upstream's own state builders, over the fake CUDA
driver: upstream's `TritonAttnBackend.init_cuda_graph_state` and
`FlashAttentionBackend.init_cuda_graph_state` run on small shapes; the context-sized buffers
come back reserved with the planner's layout, everything else is upstream's; the runner gate
commits before a replay and sends a batch it cannot commit to the eager path."""

from __future__ import annotations

import math
import types

import pytest
import torch
from decisions import decide
from fake_cuda import MIB, FakeDriver, FakeVmmApi
from sglang.srt.mem_cache.segmented import attention_graph_buffers, modes, verify_mask_buffers
from sglang.srt.mem_cache.segmented.cuda_backing import CudaBackingFactory, VmmDevice
from sglang.srt.mem_cache.segmented.graph_layouts import GraphBatch
from sglang.srt.mem_cache.segmented.runtime import RUNTIME

from sglang_kvalloc.core import planner
from sglang_kvalloc.upstream import plugin

G = 2 * MIB


@pytest.fixture
def segmented_on_fake_gpu():
    driver = FakeDriver(capacity=512 * MIB)
    factory = CudaBackingFactory(VmmDevice(FakeVmmApi(driver), 0, background_refill=False))
    RUNTIME.backings = factory
    decide(modes.SEGMENTED, explicit_commits=True)
    yield driver
    RUNTIME.graph.release_all()


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
    attention_graph_buffers.around_triton_init_cuda_graph_state(
        TritonAttnBackend.init_cuda_graph_state, backend, max_bs, max_bs
    )
    (buffer,) = RUNTIME.graph.buffers
    assert buffer.layout == planner.triton_kv_indices_layout(max_bs, context)
    kv = backend.cuda_graph_kv_indices
    assert kv.shape == (max_bs * context,) and kv.dtype == torch.int64  # 1.28 GB, reserved
    # Only the first granule is committed (upstream may poke element 0 at set-up).
    assert buffer.committed_bytes == G and int(kv[::1_000_000].count_nonzero()) == 0
    # Everything else is upstream's ordinary allocation at its own shape.
    assert backend.cuda_graph_attn_logits.shape == (max_bs, 4, 2, 16)
    assert backend.cuda_graph_num_kv_splits.shape == (max_bs,)
    # Static mode (or a caller's buffer) leaves upstream alone.
    decide(modes.STATIC)
    other = triton_stub(1000)
    attention_graph_buffers.around_triton_init_cuda_graph_state(
        TritonAttnBackend.init_cuda_graph_state, other, 4, 4
    )
    assert len(RUNTIME.graph.buffers) == 1 and other.cuda_graph_kv_indices.numel() == 4000


def test_fa3_page_tables_are_reserved_rows(segmented_on_fake_gpu) -> None:
    from sglang.srt.layers.attention.flashattention_backend import FlashAttentionBackend

    context, max_bs, page = 1_000_000, 8, 16
    backend = types.SimpleNamespace(
        max_context_len=context, page_size=page, device="cpu", _get_scheduler_metadata=None,
        use_mla=False, local_attn_builder=None, use_sliding_window_kv_pool=True, topk=1,
        speculative_num_draft_tokens=None, is_encoder_decoder=False,
    )  # fmt: skip
    attention_graph_buffers.around_fa3_init_cuda_graph_state(
        FlashAttentionBackend.init_cuda_graph_state, backend, max_bs, max_bs
    )
    layout = planner.fa3_page_table_layout(max_bs, context, page)
    assert [b.layout for b in RUNTIME.graph.buffers] == [layout, layout]  # page + SWA tables
    meta = backend.decode_cuda_graph_metadata
    assert meta["page_table"].shape == meta["swa_page_table"].shape == (max_bs, 62_500)
    assert meta["cache_seqlens"].shape == (max_bs,)  # upstream's own
    # The planner states what a batch commits; the gate commits exactly that per table.
    runner = types.SimpleNamespace(capture_bs=[1, 2, 4, 8], seq_len_fill_value=1)
    batch = types.SimpleNamespace(
        batch_size=3, seq_lens_cpu=torch.tensor([10, 600_000, 5]), seq_lens=None
    )
    assert plugin.around_can_run_graph(lambda r, b: True, runner, batch) is True
    expected = attention_graph_buffers.graph_batch(runner, batch)
    assert expected == GraphBatch(rows=4, seq_lens_sum=600_016, max_seq_len=600_000)
    for buffer in RUNTIME.graph.buffers:
        assert buffer.committed_bytes == layout.commit_bytes(expected, G)
    assert attention_graph_buffers.release_at_idle() == 2 * layout.commit_bytes(expected, G)


def test_fa3_local_attention_tables_are_reserved_and_replays_write_committed_rows(
    segmented_on_fake_gpu,
) -> None:
    """Llama-4's chunked local attention under fa3: the three virtual-batch tables are
    reserved at upstream's shape; before a replay the gate commits the rows upstream's
    `update_for_replay` then writes, and what it writes equals the same fill of ordinary
    tables."""
    from sglang.srt.layers.attention.flashattention_backend import FlashAttentionBackend
    from sglang.srt.layers.attention.local_attention import LocalAttentionMetadataBuilder

    context, max_bs, page, chunk = 1_000_000, 8, 1, 8192

    def fa3_with_local_attention() -> types.SimpleNamespace:
        builder = LocalAttentionMetadataBuilder(
            attention_chunk_size=chunk, page_size=page, max_context_len=context,
            device=torch.device("cpu"), swa_translate=None,
        )  # fmt: skip
        return types.SimpleNamespace(
            max_context_len=context, page_size=page, device="cpu", _get_scheduler_metadata=None,
            use_mla=False, local_attn_builder=builder, use_sliding_window_kv_pool=False,
            topk=1, speculative_num_draft_tokens=None, is_encoder_decoder=False,
        )  # fmt: skip

    backend = fa3_with_local_attention()
    attention_graph_buffers.around_fa3_init_cuda_graph_state(
        FlashAttentionBackend.init_cuda_graph_state, backend, max_bs, max_bs
    )
    layouts = planner.fa3_local_attention_layouts(max_bs, context, chunk, page)
    by_name = {b.layout.name: b for b in RUNTIME.graph.buffers}
    assert set(by_name) == {"fa3 page table", *(layout.name for layout in layouts)}
    local = backend.decode_cuda_graph_local_attn_metadata
    virtual = max_bs * -(-context // chunk)  # 8 x 123
    assert local["local_block_table"].shape == (virtual, chunk)  # 32 MB, reserved
    assert local["local_seqused_k"].shape == (virtual,)
    assert local["local_query_start_loc"].shape == (virtual + 1,)
    table = by_name["fa3 local_block_table"]
    assert table.committed_bytes == G  # the first granule only

    # A decode batch of 3 (padded to 4): one 600K-token request reaches chunk 73.
    seq_lens = torch.tensor([10, 600_000, 5, 1], dtype=torch.int32)
    runner = types.SimpleNamespace(capture_bs=[1, 2, 4, 8], seq_len_fill_value=1)
    batch = types.SimpleNamespace(batch_size=3, seq_lens_cpu=seq_lens[:3], seq_lens=None)
    assert plugin.around_can_run_graph(lambda r, b: True, runner, batch) is True
    expected = attention_graph_buffers.graph_batch(runner, batch)
    for layout in layouts:
        assert by_name[layout.name].committed_bytes == max(
            G, layout.commit_bytes(expected, G)
        )  # fmt: skip
    # Upstream's own fill, over the reserved tables and over ordinary ones.
    page_table = torch.arange(4 * context, dtype=torch.int32).reshape(4, context) % 997 + 1
    meta = types.SimpleNamespace(
        cache_seqlens_int32=seq_lens, page_table=page_table, local_attn_metadata=None
    )
    seen_rows: dict[str, int] = {}

    def upstream_fill(builder, meta, bs, *, buffers):
        seen_rows.update({name: tensor.shape[0] for name, tensor in buffers.items()})
        return LocalAttentionMetadataBuilder.update_for_replay(builder, meta, bs, buffers=buffers)

    plugin.around_local_attention_update_for_replay(
        upstream_fill, backend.local_attn_builder, meta, 4, buffers=local
    )
    # Upstream zeroes the table past the batch: it is handed the committed rows only (one
    # granule: 64 rows of 32 KiB; the vectors' granule holds all their 985 entries).
    assert seen_rows == {
        "local_block_table": G // (chunk * 4),
        "local_seqused_k": virtual,
        "local_query_start_loc": virtual + 1,
    }
    decide(modes.STATIC)
    plain = fa3_with_local_attention().local_attn_builder.alloc_cuda_graph_buffers(max_bs)
    backend.local_attn_builder.update_for_replay(meta, 4, buffers=plain)
    written = 4 + 1  # one virtual batch per decode row (its last chunk), and one more
    assert table.layout.rows_written(expected) == written
    for name, tensor in local.items():
        assert torch.equal(tensor, plain[name]), name
        for row in range(written):
            buffer = by_name[f"fa3 {name}"]
            assert buffer._rows.covered_items(row, 4) == buffer.layout.items, (name, row)
    assert int(plain["local_block_table"][:4].count_nonzero()) > 0
    assert attention_graph_buffers.release_at_idle() == sum(
        max(G, layout.commit_bytes(expected, G)) for layout in layouts
    ) + planner.fa3_page_table_layout(max_bs, context, page).commit_bytes(expected, G)


@pytest.mark.parametrize("page", [1, 16])
@pytest.mark.parametrize(("topk", "draft"), [(1, None), (1, 8), (4, 8)])
@pytest.mark.parametrize("swa", [False, True])
@pytest.mark.parametrize("local", [False, True])
def test_fa3_leaves_nothing_at_max_batch_x_context(segmented_on_fake_gpu, page, topk, draft,
                                                   swa, local) -> None:  # fmt: skip
    """Every fa3 configuration (page size, speculative top-k, sliding window, Llama-4's local
    attention): of what upstream's `init_cuda_graph_state` allocates the ordinary way, nothing
    scales with max batch x context; and every reserved buffer is one the planner prices."""
    from sglang.srt.layers.attention.flashattention_backend import FlashAttentionBackend
    from sglang.srt.layers.attention.local_attention import LocalAttentionMetadataBuilder

    context, max_bs, chunk = 1_000_000, 8, 8192
    builder = None
    if local:
        builder = LocalAttentionMetadataBuilder(
            attention_chunk_size=chunk, page_size=page, max_context_len=context,
            device=torch.device("cpu"), swa_translate=None,
        )  # fmt: skip
    backend = types.SimpleNamespace(
        max_context_len=context, page_size=page, device="cpu", _get_scheduler_metadata=None,
        use_mla=False, local_attn_builder=builder, use_sliding_window_kv_pool=swa,
        has_swa=swa, topk=topk, speculative_num_draft_tokens=draft, speculative_step_id=0,
        is_encoder_decoder=False, is_draft_runner=False, skip_prefill=False,
    )  # fmt: skip
    ordinary: list[tuple[int, ...]] = []
    real = {name: getattr(torch, name) for name in ("zeros", "empty", "full", "ones")}

    def spy(name: str):
        def allocate(*args, **kwargs):
            tensor = real[name](*args, **kwargs)
            ordinary.append(tuple(tensor.shape))
            return tensor

        return allocate

    try:
        for name in real:
            setattr(torch, name, spy(name))
        attention_graph_buffers.around_fa3_init_cuda_graph_state(
            FlashAttentionBackend.init_cuda_graph_state, backend, max_bs, max_bs * (draft or 1)
        )
    finally:
        for name, fn in real.items():
            setattr(torch, name, fn)
    pages = -(-context // page)
    assert [s for s in ordinary if math.prod(s) >= max_bs * pages // 4] == []
    # The planner prices each reserved buffer (names and layouts are one shared function).
    spec = planner.model_spec_from_config(
        {"architectures": ["Llama4ForCausalLM" if local else "LlamaForCausalLM"],
         "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
         "num_hidden_layers": 4, "vocab_size": 100, "intermediate_size": 128,
         "max_position_embeddings": context, "attention_chunk_size": chunk}
    )  # fmt: skip
    priced = planner.cuda_graph_allocations(
        spec, backend="fa3", max_bs=max_bs, context_len=context, page_size=page,
        speculative_draft_tokens=draft or 0, speculative_topk=topk,
    )  # fmt: skip
    layouts = {a.lazy for a in priced if a.lazy is not None}
    for buffer in RUNTIME.graph.buffers:
        if "swa-spec" in buffer.layout.name and not spec.is_hybrid_swa:
            continue  # the backend has a sliding window, the planner's stand-in model not
        assert buffer.layout in layouts, buffer.layout.name


def test_a_batch_whose_buffers_cannot_be_committed_runs_eager(segmented_on_fake_gpu) -> None:
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    driver = segmented_on_fake_gpu
    backend = triton_stub(20_000_000)
    attention_graph_buffers.around_triton_init_cuda_graph_state(
        TritonAttnBackend.init_cuda_graph_state, backend, 8, 8
    )
    runner = types.SimpleNamespace(capture_bs=[8], seq_len_fill_value=1, max_bs=8)
    attention_graph_buffers.around_capture(lambda r: None, runner)  # the fill is committed first
    assert RUNTIME.graph.buffers[0].committed_bytes == G
    huge = types.SimpleNamespace(batch_size=8, seq_lens_cpu=torch.full((8,), 19_000_000))
    assert plugin.around_can_run_graph(lambda r, b: True, runner, huge) is False
    assert RUNTIME.graph.eager_fallbacks == 1  # 1.2 GB of indices: over the 512 MiB
    assert RUNTIME.graph.buffers[0].committed_bytes == 0  # back to nothing, as on every rank
    small = types.SimpleNamespace(batch_size=5, seq_lens_cpu=torch.full((5,), 100_000))
    assert plugin.around_can_run_graph(lambda r, b: True, runner, small) is True
    assert plugin.around_can_run_graph(lambda r, b: False, runner, huge) is False
    assert RUNTIME.graph.eager_fallbacks == 1  # upstream said no: not our fallback
    assert driver.physical_bytes > G
    assert RUNTIME.graph.stats()["cuda_graph_eager_fallbacks"] == 1


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
    attention_graph_buffers.around_flashinfer_init_cuda_graph_state(
        FlashInferAttnBackend.init_cuda_graph_state, backend, max_bs, max_bs
    )
    assert backend.num_wrappers == 2
    indices = planner.flashinfer_kv_indices_layout(max_bs, context, 1)
    mask = planner.flashinfer_custom_mask_layout(max_bs, context)
    assert sorted(b.layout.name for b in RUNTIME.graph.buffers) == sorted(
        [indices.name, indices.name, mask.name]
    )
    assert [x.shape for x in backend.cuda_graph_kv_indices] == [(max_bs * context,)] * 2
    assert backend.cuda_graph_custom_mask.shape == (max_bs * context,)
    # 640 MB of indices per wrapper and 80 MB of mask reserved; one granule each committed
    # (besides the device's scratch handles).
    scratch = RUNTIME.backings.device.scratch_bytes
    assert driver.physical_bytes - scratch <= 3 * G
    # A verify batch: the mask commits per query token, the indices per position.
    batch = GraphBatch(rows=8, seq_lens_sum=800_000, max_seq_len=100_000, tokens_per_row=4)
    attention_graph_buffers.ensure_for(batch)
    by_name = {b.layout.name: b for b in RUNTIME.graph.buffers}
    assert by_name[mask.name].committed_bytes == mask.commit_bytes(batch, G)
    assert mask.items_needed(batch) == (800_000 + 8 * 5) * 4


def test_ranks_agree_on_eager_and_all_go_back_to_nothing(segmented_on_fake_gpu, monkeypatch):
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    backend = triton_stub(1_000_000)
    attention_graph_buffers.around_triton_init_cuda_graph_state(
        TritonAttnBackend.init_cuda_graph_state, backend, 8, 8
    )
    runner = types.SimpleNamespace(capture_bs=[8], seq_len_fill_value=1, max_bs=8)
    votes = []

    def another_rank_failed(value: int) -> int:
        votes.append(value)
        return 0

    monkeypatch.setattr(RUNTIME.settings, "agree", another_rank_failed)
    batch = types.SimpleNamespace(batch_size=8, seq_lens_cpu=torch.full((8,), 100_000))
    assert plugin.around_can_run_graph(lambda r, b: True, runner, batch) is False
    assert votes == [1]  # this rank could commit; another could not
    assert RUNTIME.graph.buffers[0].committed_bytes == 0
    # A batch that needs nothing new does not call the agreement at all.
    monkeypatch.setattr(RUNTIME.settings, "agree", lambda value: value)
    assert plugin.around_can_run_graph(lambda r, b: True, runner, batch) is True
    votes.clear()
    monkeypatch.setattr(RUNTIME.settings, "agree", another_rank_failed)
    assert plugin.around_can_run_graph(lambda r, b: True, runner, batch) is True
    assert votes == []


def speculative_triton(monkeypatch, context: int, max_bs: int, draft: int) -> types.SimpleNamespace:
    """A target runner's triton backend built by upstream's own state builder, speculative,
    with the GPU's FULL_MASK verify mask."""
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend
    from sglang.srt.speculative import eagle_utils

    monkeypatch.setattr(eagle_utils, "_is_cpu", False)  # the GPU's mask layout
    backend = triton_stub(context)
    backend.num_draft_tokens = draft
    attention_graph_buffers.around_triton_init_cuda_graph_state(
        TritonAttnBackend.init_cuda_graph_state, backend, max_bs, max_bs * draft
    )
    return backend


def write_verify_mask(backend: types.SimpleNamespace, seq_lens: list[int], draft: int) -> int:
    """What upstream's tree kernel writes: draft x (seq_len + draft) bytes per request, end to
    end, from the start of the backend's verify mask. Returns the bytes written."""
    nbytes = sum(draft * (n + draft) for n in seq_lens)
    backend._verify_mask.buffer[:nbytes].fill_(1)
    return nbytes


def test_verify_mask_is_reserved_and_committed_where_the_draft_writes_it(
    segmented_on_fake_gpu, monkeypatch
) -> None:
    from sglang.srt.layers.attention.verify_mask import TreeMaskMode

    context, max_bs, draft = 1_000_000, 8, 4
    backend = speculative_triton(monkeypatch, context, max_bs, draft)
    layout = planner.verify_mask_layout(max_bs, draft, context)
    mask = backend._verify_mask
    assert mask.mode == TreeMaskMode.FULL_MASK and mask.buffer.dtype == torch.uint8
    assert mask.buffer.shape == (layout.items,) == (8 * 4 * 1_000_004,)  # 32 MB, reserved
    (lazy,) = [b for b in RUNTIME.graph.buffers if b.layout == layout]
    assert lazy.committed_bytes == G
    # The draft stage's tail commits what it is about to write, before it writes.
    target = types.SimpleNamespace(model_runner=types.SimpleNamespace(attn_backend=backend))
    seq_lens = [900_000, 300_000, 7]
    batch = types.SimpleNamespace(
        seq_lens=torch.tensor(seq_lens), seq_lens_cpu=torch.tensor(seq_lens), seq_lens_sum=None
    )
    written = []

    def tail(batch, *args, target_worker, num_draft_tokens, **kwargs):
        verify_mask = target_worker.model_runner.attn_backend._verify_mask
        assert verify_mask.fits(len(batch.seq_lens))
        nbytes = write_verify_mask(target_worker.model_runner.attn_backend, seq_lens, draft)
        assert lazy.backing.is_committed(0, nbytes)  # every byte written lands in memory
        written.append(nbytes)
        return "verify input"

    result = verify_mask_buffers.around_build_eagle_verify_input(
        tail, batch, None, None, None, None, None,
        target_worker=target, topk=4, num_steps=3, num_draft_tokens=draft,
        tree_mask_mode=TreeMaskMode.FULL_MASK, device="cpu",
    )  # fmt: skip
    assert result == "verify input"
    expected = GraphBatch(3, sum(seq_lens), 900_000, draft)
    assert lazy.committed_bytes == layout.commit_bytes(expected, G)
    assert written[0] <= lazy.committed_bytes < written[0] + 2 * G
    # The planner prices the same buffer with the same layout (one function, not two).
    (priced,) = [
        a
        for a in planner.cuda_graph_allocations(
            planner.model_spec_from_config(planner.load_model_config("llama-3.1-8b")),
            backend="triton", max_bs=max_bs,
            context_len=context, page_size=1, speculative_draft_tokens=draft,
        )
        if a.name == planner.VERIFY_MASK
    ]  # fmt: skip
    assert priced.lazy == layout and priced.bytes == layout.reserved_bytes
    assert attention_graph_buffers.release_at_idle() >= lazy.layout.commit_bytes(expected, G)
    assert lazy.committed_bytes == 0


def test_a_verify_mask_that_cannot_be_committed_makes_the_draft_build_its_own(
    segmented_on_fake_gpu, monkeypatch
) -> None:
    # 8 x 4 x 20M B = 640 MB reserved on a 512 MiB device; one batch of 8 x 19M cannot commit.
    context, max_bs, draft = 20_000_000, 8, 4
    backend = speculative_triton(monkeypatch, context, max_bs, draft)
    mask = backend._verify_mask
    target = types.SimpleNamespace(model_runner=types.SimpleNamespace(attn_backend=backend))
    lens = torch.full((8,), 19_000_000)
    batch = types.SimpleNamespace(seq_lens=lens, seq_lens_cpu=lens, seq_lens_sum=None)
    seen = []

    def tail(batch, *args, target_worker, num_draft_tokens, **kwargs):
        seen.append(target_worker.model_runner.attn_backend._verify_mask.fits(8))
        return "own mask"

    assert (
        verify_mask_buffers.around_build_eagle_verify_input(
            tail, batch, target_worker=target, num_draft_tokens=draft
        )
        == "own mask"
    )
    assert seen == [False]  # the draft allocated its own mask, wrote nothing uncommitted
    assert backend._verify_mask is mask  # and the backend's is back for the verify step
    assert RUNTIME.graph.draft_mask_fallbacks == 1
    assert RUNTIME.graph.stats()["cuda_graph_draft_mask_fallbacks"] == 1
    # Zero draft steps: one token per request, filled with True by upstream.
    small = types.SimpleNamespace(seq_lens=torch.tensor([1000, 2000]), seq_lens_cpu=None)
    small.seq_lens_sum = 3000
    worker = types.SimpleNamespace(_target_worker=target)

    def trivial(worker, batch):
        assert worker._target_worker.model_runner.attn_backend._verify_mask.fits(2)
        (lazy,) = [b for b in RUNTIME.graph.buffers if b.layout.name == planner.VERIFY_MASK]
        assert lazy.backing.is_committed(0, 1000 + 1 + 2000 + 1)
        return "trivial"

    assert (
        verify_mask_buffers.around_build_trivial_verify_input(trivial, worker, small) == "trivial"
    )


@pytest.mark.parametrize("which", ["triton", "flashinfer"])
def test_multi_step_draft_indices_are_reserved_and_committed_per_step(
    segmented_on_fake_gpu, which: str
) -> None:
    from sglang.srt.layers.attention.flashinfer_backend import FlashInferMultiStepDraftBackend
    from sglang.srt.layers.attention.triton_backend import TritonMultiStepDraftBackend
    from sglang.srt.speculative.spec_utils import draft_kv_indices_used_len

    steps, topk, context, max_bs = 3, 2, 1_000_000, 8
    rows_given = []
    step_backend = types.SimpleNamespace(
        max_kv_splits=2,
        init_cuda_graph_state=lambda bs, tokens, kv_indices_buf, **kw: rows_given.append(
            kv_indices_buf
        ),
    )
    backend = types.SimpleNamespace(
        speculative_num_steps=steps, topk=topk, max_context_len=context, device="cpu",
        window_rail=False, attn_backends=[step_backend] * steps,
    )  # fmt: skip
    if which == "triton":
        attention_graph_buffers.around_triton_draft_init_cuda_graph_state(
            TritonMultiStepDraftBackend.init_cuda_graph_state, backend, max_bs, max_bs
        )
        layout = planner.triton_draft_kv_indices_layout(steps, max_bs, topk, context)
    else:
        attention_graph_buffers.around_flashinfer_draft_init_cuda_graph_state(
            FlashInferMultiStepDraftBackend.init_cuda_graph_state, backend, max_bs, max_bs
        )
        layout = planner.flashinfer_draft_kv_indices_layout(steps, max_bs, topk, context)
    (lazy,) = RUNTIME.graph.buffers
    assert lazy.layout == layout and layout.rows == steps
    assert backend.cuda_graph_kv_indices.shape == (steps, max_bs * topk * context)  # reserved
    assert len(rows_given) == steps - 1 and rows_given[1].shape == (max_bs * topk * context,)
    # The draft runner (its own can_run_graph, inherited capture) commits for its branches.
    runner = types.SimpleNamespace(
        draft_attn_backend=backend, topk=topk, speculative_num_steps=steps,
        capture_bs=[1, 2, 4, 8], seq_len_fill_value=1, max_bs=max_bs, captured_req_width=1,
    )  # fmt: skip
    attention_graph_buffers.around_capture(lambda r: None, runner)
    capture = planner.draft_graph_batch(max_bs, max_bs, 1, topk, steps)
    assert lazy.committed_bytes == layout.commit_bytes(capture, G) == steps * G
    seq_lens = [100_000, 5, 300_000]
    batch = types.SimpleNamespace(batch_size=3, seq_lens_cpu=torch.tensor(seq_lens))
    assert plugin.around_can_run_graph(lambda r, b: True, runner, batch) is True
    padded_sum = sum(seq_lens) + 1  # padded to 4 rows at the fill value
    expected = planner.draft_graph_batch(4, padded_sum, 300_000, topk, steps)
    assert attention_graph_buffers.graph_batch(runner, batch) == expected
    assert lazy.committed_bytes == layout.commit_bytes(expected, G)
    # Every step's row is backed as far as upstream's own formula says that step reads.
    for step in range(steps):
        used = draft_kv_indices_used_len(padded_sum, topk, 4 * topk, step + 1)
        used *= layout.item_bytes
        assert lazy.backing.is_committed(step * layout.row_bytes, used), step
    assert attention_graph_buffers.release_at_idle() == layout.commit_bytes(expected, G)
