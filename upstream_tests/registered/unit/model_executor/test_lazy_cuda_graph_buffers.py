"""Segmented mode's cuda-graph index buffers: reserved at upstream's shape, committed
before each replay as far as the batch writes, released at idle, at a fixed address.

CPU only: a CPU reservation stands in for device memory; upstream's own
`TritonAttnBackend.init_cuda_graph_state` runs on a small stand-in backend.

    python -m pytest test/registered/unit/model_executor/test_lazy_cuda_graph_buffers.py -v
"""

import types
import unittest

import torch

from sglang.srt.layers.attention.triton_backend import TritonAttnBackend
from sglang.srt.mem_cache.segmented import attention_graph_buffers, graph_layouts, modes
from sglang.srt.mem_cache.segmented.cpu_backing import CpuBackingFactory, CpuMmapBacking
from sglang.srt.mem_cache.segmented.graph_buffers import LazyGraphBuffer
from sglang.srt.mem_cache.segmented.graph_layouts import GraphBatch
from sglang.srt.mem_cache.segmented.runtime import RUNTIME
from sglang.srt.plugins import load_plugins
from sglang.test.ci.ci_register import register_cpu_ci
from sglang.test.test_utils import CustomTestCase

register_cpu_ci(est_time=15, suite="base-a-test-cpu")

G = CpuBackingFactory().granularity  # the OS page


def row_bytes_written(longest: int) -> int:
    """A page table row written for a replay whose longest request has ``longest`` tokens:
    one int32 page id per position (page size 1), the new token's and one more."""
    return -(-(longest + 2) * 4 // G) * G


def triton_backend(context: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        dllm_attention=None, num_head=2, max_kv_splits=2, v_head_dim=8,
        swa_v_head_dim=None, device="cpu", lean_total_programs=2, lean_block_m=4,
        is_draft_runner=False, skip_prefill=False, num_draft_tokens=None,
        sliding_window_size=None, use_sliding_window_kv_pool=False,
        max_context_len=context,
    )  # fmt: skip


class TestLazyCudaGraphBuffers(CustomTestCase):
    @classmethod
    def setUpClass(cls):
        load_plugins()  # as the scheduler process does before building its runners

    def setUp(self):
        RUNTIME.reset()
        self.addCleanup(RUNTIME.reset)

    def test_a_page_table_commits_the_rows_and_lengths_a_replay_writes(self):
        max_bs, context = 8, 1 << 20  # 8 rows of 4 MiB reserved, each granule-aligned
        layout = graph_layouts.fa3_page_table_layout(max_bs, context, page_size=1)
        buffer = LazyGraphBuffer(layout, CpuMmapBacking(layout.reserved_bytes, G))
        table = buffer.backing.tensor(torch.int32, (max_bs, layout.items))
        address = table.data_ptr()
        self.assertEqual(buffer.committed_bytes, 0)  # reserved, nothing committed

        small = GraphBatch(rows=4, seq_lens_sum=100_010, max_seq_len=100_000)
        self.assertEqual(buffer.ensure(small), 4 * row_bytes_written(100_000))
        self.assertEqual(buffer.committed_bytes, layout.commit_bytes(small, G))
        self.assertTrue(buffer.backing.is_committed(3 * layout.row_bytes, 400_000))
        self.assertFalse(buffer.backing.is_committed(4 * layout.row_bytes, 4))
        table[0, :100] = 7  # the replay's fill

        large = GraphBatch(rows=8, seq_lens_sum=2_000_000, max_seq_len=300_000)
        grown = buffer.ensure(large)
        self.assertEqual(buffer.committed_bytes, 8 * row_bytes_written(300_000))
        self.assertEqual(grown, buffer.committed_bytes - 4 * row_bytes_written(100_000))
        self.assertEqual(int(table[0, :100].sum()), 700)  # growth kept what was written
        # A smaller replay commits nothing more, and gives nothing back mid-serving.
        self.assertEqual(buffer.ensure(GraphBatch(2, 2000, 1000)), 0)

        self.assertEqual(buffer.release(), 8 * row_bytes_written(300_000))  # idle
        self.assertEqual(buffer.committed_bytes, 0)
        self.assertEqual(int(table[0, :100].count_nonzero()), 0)  # reads zeros again
        self.assertGreater(buffer.ensure(small), 0)  # the next replay commits again
        # What a captured graph holds stayed where it was, at the same shape.
        again = buffer.backing.tensor(torch.int32, (max_bs, layout.items))
        self.assertEqual(again.data_ptr(), address)
        self.assertEqual(table.shape, (max_bs, layout.items))

    def test_triton_kv_indices_is_upstreams_allocation_reserved(self):
        max_bs, context = 4, 200_000
        layout = graph_layouts.triton_kv_indices_layout(max_bs, context)
        # Static (undecided): upstream's own allocation, the size the layout mirrors.
        plain = triton_backend(context)
        TritonAttnBackend.init_cuda_graph_state(plain, max_bs, max_bs)
        upstream = plain.cuda_graph_kv_indices
        self.assertEqual(upstream.numel(), layout.items)
        self.assertEqual(upstream.element_size(), layout.item_bytes)
        self.assertEqual(RUNTIME.graph.buffers, [])

        RUNTIME.decide(
            modes.ModeDecision(
                requested=modes.SEGMENTED, mode=modes.SEGMENTED, reason="test",
                kv_pool_kind="mha", backing=modes.CUDA_VMM, explicit_commits=True,
            )
        )  # fmt: skip
        backend = triton_backend(context)
        TritonAttnBackend.init_cuda_graph_state(backend, max_bs, max_bs)
        (lazy,) = RUNTIME.graph.buffers
        kv = backend.cuda_graph_kv_indices
        self.assertEqual(lazy.layout, layout)
        self.assertEqual((kv.shape, kv.dtype), (upstream.shape, upstream.dtype))
        self.assertEqual(
            kv.data_ptr(), lazy.backing.tensor(kv.dtype, kv.shape).data_ptr()
        )
        self.assertEqual(lazy.committed_bytes, G)  # element 0 only, of 6.4 MB
        self.assertEqual(backend.cuda_graph_attn_logits.shape, (max_bs, 2, 2, 8))

        batch = GraphBatch(rows=4, seq_lens_sum=150_000, max_seq_len=100_000)
        attention_graph_buffers.ensure_for(batch)  # what the runner's gate calls
        written = 150_000 + 4 * 2  # the lengths' sum, and two per row of slack
        self.assertEqual(lazy.committed_bytes, -(-written * 8 // G) * G)
        kv[:written] = 1
        self.assertTrue(lazy.backing.is_committed(0, written * 8))
        self.assertEqual(
            attention_graph_buffers.release_at_idle(),
            lazy.layout.commit_bytes(batch, G),
        )
        self.assertEqual(lazy.committed_bytes, 0)
        self.assertEqual(int(kv.count_nonzero()), 0)


if __name__ == "__main__":
    unittest.main()
