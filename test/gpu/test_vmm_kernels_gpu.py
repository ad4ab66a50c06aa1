"""Upstream's kernels and hooks over VMM-backed memory on a real GPU: Triton attention over
VMM K/V, decode graphs over lazy index buffers and row tables, reservations beyond the device,
the graph-buffer hook, the shared scratch and the verify mask. Run with one command (see
test/gpu/run.sh); skipped without CUDA.
"""

from __future__ import annotations

import math
import time

import torch
from gpu_timing import GIB, MIB, free_bytes, timed
from sglang.srt.mem_cache.segmented.cuda_backing import CudaBackingFactory, CudaVmmBacking

# -- upstream's Triton attention kernels over VMM-backed K/V -----------------------------------

H_Q, H_KV, D = 32, 8, 128
ROW = H_KV * D * 2  # bf16 bytes per token per buffer
TOKENS = 3_000_000  # 6 GB per buffer: slots past 2.1M sit beyond a 4 GB byte offset
HIGH = 2_200_000


def _slots(seq_lens: list[int]) -> list[torch.Tensor]:
    """Half of each request's slots low in the pool, half past the 4 GB offset."""
    out, low, high = [], 1, HIGH
    for n in seq_lens:
        a, b = n // 2, n - n // 2
        out.append(torch.cat([torch.arange(low, low + a), torch.arange(high, high + b)]))
        low, high = low + a, high + b
    return out


def _vmm_kv(device, used: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
    g = device.granularity
    backings, tensors = [], []
    for _ in range(2):
        b = CudaVmmBacking(TOKENS * ROW, device)
        lo_end = math.ceil(int(used[used < HIGH].max() + 1) * ROW / g) * g
        hi_start = (HIGH * ROW) // g * g
        hi_end = math.ceil(int(used.max() + 1) * ROW / g) * g
        b.commit(0, lo_end)
        b.commit(hi_start, hi_end - hi_start)
        backings.append(b)
        tensors.append(b.tensor(torch.bfloat16, (TOKENS, H_KV, D)))
    return tensors[0], tensors[1], backings


def test_triton_decode_and_extend_attention_equal_over_vmm_kv(vmm, results) -> None:
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd
    from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd

    api, device = vmm
    torch.manual_seed(0)
    seq_lens = [100, 1000, 5000, 20000]
    slots = _slots(seq_lens)
    used = torch.cat(slots)
    assert int(used.max()) * ROW > 4 * GIB
    k_plain = torch.zeros((TOKENS, H_KV, D), dtype=torch.bfloat16, device="cuda")
    v_plain = torch.zeros_like(k_plain)
    k_vmm, v_vmm, backings = _vmm_kv(device, used)
    idx = used.cuda()
    k_plain[idx] = torch.randn((idx.numel(), H_KV, D), dtype=torch.bfloat16, device="cuda")
    v_plain[idx] = torch.randn((idx.numel(), H_KV, D), dtype=torch.bfloat16, device="cuda")
    k_vmm[idx] = k_plain[idx]
    v_vmm[idx] = v_plain[idx]
    bs = len(seq_lens)
    kv_indptr = torch.zeros(bs + 1, dtype=torch.int32, device="cuda")
    kv_indptr[1:] = torch.cumsum(torch.tensor(seq_lens, device="cuda"), 0)
    kv_indices = idx.to(torch.int64)
    scale = 1.0 / math.sqrt(D)

    def decode(k_buffer: torch.Tensor, v_buffer: torch.Tensor) -> torch.Tensor:
        q = torch.randn((bs, H_Q, D), dtype=torch.bfloat16, device="cuda",
                        generator=torch.Generator("cuda").manual_seed(1))  # fmt: skip
        o = torch.empty((bs, H_Q, D), dtype=torch.bfloat16, device="cuda")
        splits = 8
        logits = torch.empty((bs, H_Q, splits, D), dtype=torch.float32, device="cuda")
        lse = torch.empty((bs, H_Q, splits), dtype=torch.float32, device="cuda")
        num_splits = torch.full((bs,), splits, dtype=torch.int32, device="cuda")
        decode_attention_fwd(q, k_buffer, v_buffer, o, kv_indptr, kv_indices, logits, lse,
                             num_splits, splits, scale, 1.0, 1.0)  # fmt: skip
        return o

    o_plain = decode(k_plain, v_plain)
    o_vmm = decode(k_vmm, v_vmm)
    torch.cuda.synchronize()
    assert torch.equal(o_plain, o_vmm)
    assert bool(torch.isfinite(o_plain.float()).all())

    # Extend: 64 new tokens per request on top of its cached prefix.
    extend = 64
    qo_indptr = torch.arange(0, (bs + 1) * extend, extend, dtype=torch.int32, device="cuda")
    gen = torch.Generator("cuda").manual_seed(2)
    q_ext = torch.randn((bs * extend, H_Q, D), dtype=torch.bfloat16, device="cuda", generator=gen)
    k_ext = torch.randn((bs * extend, H_KV, D), dtype=torch.bfloat16, device="cuda", generator=gen)
    v_ext = torch.randn((bs * extend, H_KV, D), dtype=torch.bfloat16, device="cuda", generator=gen)

    def extend_fwd(k_buffer: torch.Tensor, v_buffer: torch.Tensor) -> torch.Tensor:
        o = torch.empty_like(q_ext)
        extend_attention_fwd(q_ext, k_ext, v_ext, o, k_buffer, v_buffer, qo_indptr, kv_indptr,
                             kv_indices, None, True, None, extend, 1.0, 1.0,
                             sm_scale=scale)  # fmt: skip
        return o

    e_plain = extend_fwd(k_plain, v_plain)
    e_vmm = extend_fwd(k_vmm, v_vmm)
    torch.cuda.synchronize()
    assert torch.equal(e_plain, e_vmm)
    results["triton_attention_over_vmm_kv"] = {
        "decode_equal": True,
        "extend_equal": True,
        "highest_slot_byte_offset": int(used.max()) * ROW,
    }
    del k_vmm, v_vmm
    for b in backings:
        b.close()


# -- issue 9: an attention backend's cuda-graph kv_indices, reserved and committed per replay --


def test_triton_decode_graph_over_a_lazy_kv_indices_buffer(vmm, results) -> None:
    """Upstream's triton decode kernel captured in a CUDA graph reading a kv_indices buffer of
    upstream's cuda-graph shape (max tokens x context, int64) that is reserved, not allocated.
    Before each replay the batch's need is committed (as the can_run_graph hook does), the
    indices are filled (as the backend's replay prep does), and the output must equal an eager
    run over an ordinary buffer, while the sum of sequence lengths grows past what was
    committed at capture, after an idle release, and regrows."""
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd
    from sglang.srt.mem_cache.segmented.graph_buffers import LazyGraphBuffer
    from sglang.srt.mem_cache.segmented.graph_layouts import FLAT, GraphBatch, GraphBufferLayout

    api, device = vmm
    max_bs, context, slots = 8, 4_000_000, 400_000
    layout = GraphBufferLayout("triton cuda_graph_kv_indices", FLAT, 1, max_bs * context, 8)
    buffer = LazyGraphBuffer(layout, CudaVmmBacking(layout.reserved_bytes, device))
    kv_indices = buffer.backing.tensor(torch.int64, (layout.items,))
    gen = torch.Generator("cuda").manual_seed(3)
    k = torch.randn((slots, H_KV, D), dtype=torch.bfloat16, device="cuda", generator=gen)
    v = torch.randn((slots, H_KV, D), dtype=torch.bfloat16, device="cuda", generator=gen)
    q = torch.randn((max_bs, H_Q, D), dtype=torch.bfloat16, device="cuda", generator=gen)
    splits = 8
    o = torch.empty((max_bs, H_Q, D), dtype=torch.bfloat16, device="cuda")
    logits = torch.empty((max_bs, H_Q, splits, D), dtype=torch.float32, device="cuda")
    lse = torch.empty((max_bs, H_Q, splits), dtype=torch.float32, device="cuda")
    num_splits = torch.full((max_bs,), splits, dtype=torch.int32, device="cuda")
    kv_indptr = torch.zeros(max_bs + 1, dtype=torch.int32, device="cuda")
    scale = 1.0 / math.sqrt(D)

    def run(indices: torch.Tensor, out: torch.Tensor) -> None:
        decode_attention_fwd(q, k, v, out, kv_indptr, indices, logits, lse, num_splits, splits,
                             scale, 1.0, 1.0)  # fmt: skip

    def fill(seq_lens: list[int]) -> tuple[torch.Tensor, float]:
        batch = GraphBatch(rows=max_bs, seq_lens_sum=sum(seq_lens), max_seq_len=max(seq_lens))
        commit_us = timed(lambda: buffer.ensure(batch))
        total = sum(seq_lens)
        kv_indptr[1:] = torch.cumsum(torch.tensor(seq_lens, device="cuda"), 0)
        indices = torch.randint(0, slots, (total,), device="cuda", generator=gen)
        kv_indices[:total] = indices
        return indices, commit_us

    capture_lens = [1] * max_bs  # upstream captures with seq_len_fill_value 1
    fill(capture_lens)
    committed_at_capture = buffer.committed_bytes
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run(kv_indices, o)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(kv_indices, o)

    rounds = []
    schedule = [[1000] * max_bs, [100_000] * max_bs, [400_000, 5, 300_000, 7, 1, 250_000, 9, 3]]
    schedule += [[2000] * max_bs]  # after the idle release below
    for i, seq_lens in enumerate(schedule):
        if i == 3:
            released = buffer.release()
            assert released > 0 and buffer.committed_bytes == 0
        indices, commit_us = fill(seq_lens)
        graph.replay()
        expected = torch.empty_like(o)
        run(indices, expected)
        torch.cuda.synchronize()
        assert torch.equal(o, expected), f"round {i}: graph output differs from eager"
        batch = GraphBatch(max_bs, sum(seq_lens), max(seq_lens))
        rounds.append(
            {
                "seq_lens_sum": sum(seq_lens),
                "commit_us": round(commit_us, 1),
                "committed_bytes": buffer.committed_bytes,
                "commit_bytes_from_empty": layout.commit_bytes(batch, device.granularity),
            }
        )
    # What the planner prints for a batch is what the buffer holds after committing it.
    assert rounds[-1]["committed_bytes"] == rounds[-1]["commit_bytes_from_empty"]
    assert rounds[2]["committed_bytes"] >= rounds[2]["commit_bytes_from_empty"]
    results["triton_graph_over_lazy_kv_indices"] = {
        "reserved_bytes": layout.reserved_bytes,
        "committed_at_capture_bytes": committed_at_capture,
        "replays": rounds,
        "outputs_equal_eager": True,
    }
    del graph
    buffer.release()
    buffer.backing.close()


def test_graph_reading_a_lazy_row_table_across_growth(vmm, results) -> None:
    """A rows-layout table (fa3's page-table shape: max batch x pages, int32) reserved at a 10M
    width: rows committed as far as the batch's longest sequence before the fill; a captured
    gather reads it across growth and an idle release."""
    from sglang.srt.mem_cache.segmented.graph_buffers import LazyGraphBuffer
    from sglang.srt.mem_cache.segmented.graph_layouts import ROWS, GraphBatch, GraphBufferLayout

    api, device = vmm
    max_bs, pages = 16, 10_000_000
    layout = GraphBufferLayout("fa3 page_table", ROWS, max_bs, pages, 4)
    buffer = LazyGraphBuffer(layout, CudaVmmBacking(layout.reserved_bytes, device))
    table = buffer.backing.tensor(torch.int32, (max_bs, pages))
    probe_cols = torch.tensor([0, 1, 999, 600_000, 1_500_000], device="cuda")
    out = torch.zeros((max_bs, probe_cols.numel()), dtype=torch.int32, device="cuda")
    buffer.ensure(GraphBatch(max_bs, max_bs, 1))
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out.copy_(table[:, probe_cols])
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        out.copy_(table[:, probe_cols])
    figures = []
    for rows, longest in [(4, 1000), (16, 1_600_000), (2, 2_000)]:
        batch = GraphBatch(rows, rows * longest, longest)
        commit_us = timed(lambda b=batch: buffer.ensure(b))
        table[:rows, :longest] = torch.arange(longest, dtype=torch.int32, device="cuda") + 7
        graph.replay()
        torch.cuda.synchronize()
        visible = probe_cols < longest
        assert torch.equal(out[:rows, visible], (probe_cols[visible] + 7).int().expand(rows, -1))
        figures.append({"rows": rows, "longest": longest, "commit_us": round(commit_us, 1),
                        "committed_bytes": buffer.committed_bytes})  # fmt: skip
        if rows == 16:
            assert buffer.release() > 0  # idle: everything goes
            graph.replay()  # reads the scratch page: zeros, no fault
            torch.cuda.synchronize()
            assert int(out.count_nonzero()) == 0
    results["rows_table_graph"] = {"reserved_bytes": layout.reserved_bytes, "rounds": figures}
    del graph
    buffer.release()
    buffer.backing.close()


def test_reservations_beyond_the_device_memory(vmm, results) -> None:
    """Segmented mode at 10M reserves more address space than the device holds (req_to_token,
    the KV pool, the graph tables): 3 x 100 GB on an 80 GB card, costing no memory."""
    api, device = vmm
    before = free_bytes()
    start = time.perf_counter()
    backings = [CudaVmmBacking(100 * GIB, device) for _ in range(3)]
    seconds = time.perf_counter() - start
    drop = before - free_bytes()
    for backing in backings:
        t = backing.tensor(torch.int32, (100 * GIB // 4,))
        assert int(t[:: 256 * MIB // 4].count_nonzero()) == 0
        del t
    backings[2].commit(50 * GIB, 2 * MIB)  # a commit far up in the third one
    view = backings[2].tensor(torch.int32, (100 * GIB // 4,))
    view[50 * GIB // 4 : 50 * GIB // 4 + 16] = 9
    torch.cuda.synchronize()
    assert int(view[50 * GIB // 4 : 50 * GIB // 4 + 16].sum()) == 144
    del view
    for backing in backings:
        backing.close()
    results["reserve_300gb_on_the_device"] = {
        "seconds": round(seconds, 2),
        "free_memory_drop_bytes": drop,
    }
    assert drop < 64 * MIB


def test_the_graph_buffer_hook_intercepts_upstreams_allocation_on_the_gpu(vmm, results) -> None:
    """The hook module's own interception (`attention_graph_buffers` imports no upstream
    code): an allocation shaped like triton's cuda_graph_kv_indices (64 x 10M int64, 5.12 GB)
    made inside `reserved_zeros` is reserved, other allocations are ordinary; the runner gate's
    commits show up in the device's free memory, and the idle release gives them back."""
    import types

    from sglang.srt.mem_cache.segmented import attention_graph_buffers
    from sglang.srt.mem_cache.segmented.runtime import RUNTIME

    from sglang_kvalloc.core import planner

    api, device = vmm
    factory = CudaBackingFactory(device)
    tokens, context = 64, 10_000_000
    layout = planner.triton_kv_indices_layout(tokens, context)
    backend = types.SimpleNamespace(max_context_len=context)
    before = free_bytes()
    with attention_graph_buffers.reserved_zeros(
        {((layout.items,), torch.int64): layout}, factory
    ) as made:
        # What TritonAttnBackend.init_cuda_graph_state allocates, shaped as upstream does.
        backend.cuda_graph_kv_indices = torch.zeros(
            (tokens * backend.max_context_len), dtype=torch.int64, device="cuda"
        )
        backend.cuda_graph_attn_logits = torch.zeros((tokens, 32, 8, 128), device="cuda")
    after_init = free_bytes()
    assert len(made) == 1 and backend.cuda_graph_kv_indices.numel() == tokens * context
    assert backend.cuda_graph_attn_logits.is_contiguous()
    RUNTIME.graph.buffers[:] = made
    try:
        runner = types.SimpleNamespace(capture_bs=[1, 2, 4, 8, 16, 32, 64], seq_len_fill_value=1)
        fb = types.SimpleNamespace(batch_size=40, seq_lens_cpu=torch.full((40,), 250_000))
        batch = attention_graph_buffers.graph_batch(runner, fb)
        commit_us = timed(lambda: attention_graph_buffers.ensure_for(batch))
        after_commit = free_bytes()
        committed = made[0].committed_bytes
        backend.cuda_graph_kv_indices[: batch.seq_lens_sum] = 1  # the replay's fill: backed
        torch.cuda.synchronize()
        released = attention_graph_buffers.release_at_idle()
        after_release = free_bytes()
    finally:
        RUNTIME.graph.buffers.clear()
    logits_bytes = tokens * 32 * 8 * 128 * 4
    results["graph_buffer_hook_on_gpu"] = {
        "reserved_bytes": layout.reserved_bytes,
        "free_memory_drop_at_init_bytes": before - after_init,
        "ordinary_allocation_bytes": logits_bytes,
        "batch": {"rows": batch.rows, "seq_lens_sum": batch.seq_lens_sum},
        "commit_us": round(commit_us, 1),
        "committed_bytes": committed,
        "free_memory_drop_at_commit_bytes": after_init - after_commit,
        "released_bytes": released,
        "free_memory_regained_at_release_bytes": after_release - after_commit,
    }
    assert committed == layout.commit_bytes(batch, device.granularity)
    assert abs((after_init - after_commit) - (committed - device.granularity)) <= 2 * MIB
    assert released == committed
    # Init took the ordinary buffer and one granule, not 5.12 GB.
    assert before - after_init < logits_bytes + 64 * MIB
    made[0].backing.close()


def test_a_write_to_an_uncommitted_range_lands_on_the_shared_scratch(vmm, results) -> None:
    """Why every writer commits first (req_to_token rows, graph buffers, the capture fill):
    uncommitted granules all map one scratch granule, so a write there shows up in every
    other uncommitted range of the device. Measured on a device state of its own."""
    from sglang.srt.mem_cache.segmented.cuda_backing import VmmDevice

    api, _ = vmm
    own = VmmDevice(api, 0, background_refill=False)
    try:
        a = CudaVmmBacking(8 * MIB, own)
        b = CudaVmmBacking(8 * MIB, own)
        ta = a.tensor(torch.int32, (8 * MIB // 4,))
        tb = b.tensor(torch.int32, (8 * MIB // 4,))
        ta[5] = 1234  # uncommitted: lands on the scratch granule
        torch.cuda.synchronize()
        seen = int(tb[5]), int(tb[2 * MIB // 4 + 5]), int(ta[6 * MIB // 4 + 5])
        ta[5] = 0
        torch.cuda.synchronize()
        results["uncommitted_write_aliases"] = {"other_backing_and_granules_read": list(seen)}
        assert seen == (1234, 1234, 1234)
        del ta, tb
        a.close()
        b.close()
    finally:
        own.close()


def test_verify_mask_committed_where_the_draft_writes_it_reads_right(vmm, results) -> None:
    """The speculative verify mask (FULL_MASK: draft x (seq_len + draft) bytes per request, end
    to end), reserved at upstream's shape through the hook's interception. The hook around the
    draft stage's tail commits what the draft writes before it writes; upstream's triton
    extend kernel then reads the mask from the reserved buffer (as the verify step does), and
    must give what it gives over an ordinary mask. Upstream's tree kernel (sgl_kernel) is not
    on the lent machine; the test writes the mask's layout itself."""
    import types

    from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd
    from sglang.srt.mem_cache.segmented import attention_graph_buffers, verify_mask_buffers
    from sglang.srt.mem_cache.segmented.graph_layouts import GraphBatch
    from sglang.srt.mem_cache.segmented.runtime import RUNTIME

    from sglang_kvalloc.core import planner

    api, device = vmm
    factory = CudaBackingFactory(device)
    max_bs, draft, context = 64, 8, 10_000_000
    layout = planner.verify_mask_layout(max_bs, draft, context)  # 5.12 GB
    before = free_bytes()
    with attention_graph_buffers.reserved_zeros(
        {((layout.items,), torch.uint8): layout}, factory
    ) as made:
        # What maybe_create_verify_mask allocates for triton: tree_mask_numel bytes, uint8.
        buffer = torch.zeros(max_bs * draft * (context + draft), dtype=torch.uint8, device="cuda")
    assert len(made) == 1 and buffer.numel() == layout.items

    class VerifyMask:  # upstream's VerifyMask as the draft tail uses it (buffer, fits)
        def __init__(self, buffer: torch.Tensor) -> None:
            self.buffer = buffer

        def fits(self, bs: int) -> bool:
            return bs <= max_bs

    backend = types.SimpleNamespace(_verify_mask=VerifyMask(buffer), max_context_len=context)
    target = types.SimpleNamespace(model_runner=types.SimpleNamespace(attn_backend=backend))
    seq_lens = [1000, 37_000, 250_000, 600_000]
    bs = len(seq_lens)
    gen = torch.Generator("cuda").manual_seed(3)
    rows = []  # each request's mask: draft x (seq_len + draft); prefix visible, tree random
    for n in seq_lens:
        tree = torch.rand((draft, draft), generator=gen, device="cuda") < 0.5
        tree |= torch.eye(draft, dtype=torch.bool, device="cuda")
        row = torch.ones((draft, n + draft), dtype=torch.uint8, device="cuda")
        row[:, n:] = tree.to(torch.uint8)
        rows.append(row.flatten())
    plain_mask = torch.cat(rows)
    lens = torch.tensor(seq_lens)
    batch = types.SimpleNamespace(seq_lens=lens.cuda(), seq_lens_cpu=lens, seq_lens_sum=None)
    RUNTIME.graph.buffers[:] = made
    timings = {}
    try:

        def tail(batch, *args, target_worker, num_draft_tokens, **kwargs):
            # The draft stage writes the mask into the backend's buffer, in place.
            timings["committed_when_written"] = made[0].committed_bytes
            target_worker.model_runner.attn_backend._verify_mask.buffer[: plain_mask.numel()] = (
                plain_mask
            )
            return "verify input"

        start = time.perf_counter()
        verify_mask_buffers.around_build_eagle_verify_input(
            tail, batch, target_worker=target, num_draft_tokens=draft
        )
        torch.cuda.synchronize()
        hook_us = (time.perf_counter() - start) * 1e6
        committed = made[0].committed_bytes
        after = free_bytes()

        # The verify step's attention: upstream's triton extend kernel with the custom mask.
        torch.manual_seed(4)
        kv_tokens = sum(seq_lens)
        k_buffer = torch.randn((kv_tokens, H_KV, D), dtype=torch.bfloat16, device="cuda")
        v_buffer = torch.randn_like(k_buffer)
        kv_indptr = torch.zeros(bs + 1, dtype=torch.int32, device="cuda")
        kv_indptr[1:] = torch.cumsum(lens.cuda(), 0)
        kv_indices = torch.arange(kv_tokens, dtype=torch.int64, device="cuda")
        qo_indptr = torch.arange(0, (bs + 1) * draft, draft, dtype=torch.int32, device="cuda")
        mask_indptr = torch.zeros(bs + 1, dtype=torch.int64, device="cuda")
        mask_indptr[1:] = torch.cumsum(draft * (lens.cuda() + draft), 0)
        q = torch.randn((bs * draft, H_Q, D), dtype=torch.bfloat16, device="cuda")
        k_ext = torch.randn((bs * draft, H_KV, D), dtype=torch.bfloat16, device="cuda")
        v_ext = torch.randn_like(k_ext)

        def verify(mask: torch.Tensor, skip_prefix: bool) -> torch.Tensor:
            o = torch.empty_like(q)
            extend_attention_fwd(q, k_ext, v_ext, o, k_buffer, v_buffer, qo_indptr, kv_indptr,
                                 kv_indices, mask, True, mask_indptr, draft, 1.0, 1.0,
                                 sm_scale=1.0 / math.sqrt(D),
                                 skip_prefix_custom_mask=skip_prefix)  # fmt: skip
            return o

        equal = {}
        for skip_prefix in (True, False):
            o_plain = verify(plain_mask, skip_prefix)
            o_lazy = verify(buffer, skip_prefix)
            torch.cuda.synchronize()
            equal[skip_prefix] = bool(torch.equal(o_plain, o_lazy))
            assert bool(torch.isfinite(o_plain.float()).all())
        released = attention_graph_buffers.release_at_idle()
    finally:
        RUNTIME.graph.buffers.clear()
        RUNTIME.graph.verify_masks.clear()
    expected = layout.commit_bytes(
        GraphBatch(bs, sum(seq_lens), max(seq_lens), draft), device.granularity
    )
    results["verify_mask_on_gpu"] = {
        "reserved_bytes": layout.reserved_bytes,
        "mask_bytes_written": plain_mask.numel(),
        "committed_bytes": committed,
        "committed_when_the_draft_wrote": timings["committed_when_written"],
        "planner_commit_bytes": expected,
        "free_memory_drop_bytes": before - after,
        "hook_us": round(hook_us, 1),
        "extend_equal": {"skip_prefix_mask": equal[True], "full_mask_read": equal[False]},
        "released_bytes": released,
    }
    assert timings["committed_when_written"] == committed >= plain_mask.numel()
    assert committed == expected
    assert equal == {True: True, False: True}
    assert before - after <= committed + 2 * MIB  # not 5.12 GB
    assert released == committed
    made[0].backing.close()
