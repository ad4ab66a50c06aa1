"""`release_memory_occupation` / `resume_memory_occupation` in segmented mode: releasing
``kv_cache`` gives back every committed KV segment, req_to_token page and cuda-graph
buffer; resume opens the pool again and commits on demand; static is upstream's path.

CPU only: small segmented pools on CPU reservations, the scheduler's weight updater
called on a stand-in scheduler.

    python -m pytest test/registered/unit/managers/test_segmented_memory_release.py -v
"""

import types
import unittest
from unittest import mock

import torch

from sglang.srt.constants import GPU_MEMORY_TYPE_CUDA_GRAPH, GPU_MEMORY_TYPE_KV_CACHE
from sglang.srt.disaggregation.utils import DisaggregationMode
from sglang.srt.managers import io_struct
from sglang.srt.managers.scheduler_components.weight_updater import (
    SchedulerWeightUpdaterManager as Updater,
)
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.segmented import (
    kv_allocators,
    kv_pools,
    memory_release,
    modes,
)
from sglang.srt.mem_cache.segmented.graph_buffers import LazyGraphBuffer
from sglang.srt.mem_cache.segmented.graph_layouts import (
    GraphBatch,
    fa3_page_table_layout,
)
from sglang.srt.mem_cache.segmented.lazy_req_to_token import SegmentedReqToTokenPool
from sglang.srt.mem_cache.segmented.runtime import RUNTIME
from sglang.srt.plugins import load_plugins
from sglang.test.ci.ci_register import register_cpu_ci
from sglang.test.test_utils import CustomTestCase

register_cpu_ci(est_time=15, suite="base-a-test-cpu")

SIZE = 4096  # KV slots, in segments of 1024


def decide(mode: str) -> None:
    backing = modes.CPU_MMAP if mode == modes.SEGMENTED else modes.NO_BACKING
    RUNTIME.decide(modes.ModeDecision(mode, mode, "test", "mha", backing=backing))


def updater(allocator, req_to_token_pool) -> types.SimpleNamespace:
    """What upstream's two methods read of the scheduler's weight updater."""
    scheduler = types.SimpleNamespace(
        token_to_kv_pool_allocator=allocator, req_to_token_pool=req_to_token_pool,
        disaggregation_mode=DisaggregationMode.NULL, _engine_paused=False,
    )  # fmt: skip
    saver = types.SimpleNamespace(calls=[])
    saver.pause = lambda tag: saver.calls.append(("pause", tag))
    saver.resume = lambda tag: saver.calls.append(("resume", tag))
    return types.SimpleNamespace(
        scheduler=scheduler, is_fully_idle=lambda **kw: True, offload_tags=set(),
        memory_saver_adapter=saver, flush_cache=lambda: saver.calls.append("flush"),
    )  # fmt: skip


def release(who, *tags):
    # Upstream's release synchronizes the device it runs on; this test runs on none.
    no_device = types.SimpleNamespace(synchronize=lambda: None)
    with mock.patch.object(torch, "get_device_module", return_value=no_device):
        return Updater.release_memory_occupation(
            who, io_struct.ReleaseMemoryOccupationReqInput(tags=list(tags))
        )


def resume(who, *tags):
    return Updater.resume_memory_occupation(
        who, io_struct.ResumeMemoryOccupationReqInput(tags=list(tags))
    )


class TestSegmentedMemoryRelease(CustomTestCase):
    @classmethod
    def setUpClass(cls):
        load_plugins()  # as the scheduler process does

    def setUp(self):
        RUNTIME.reset()
        RUNTIME.device = "cpu"  # noted when the scheduler starts
        RUNTIME.settings.segment_tokens = 1024
        self.addCleanup(RUNTIME.reset)

    def test_kv_cache_release_gives_everything_back_and_resume_serves_again(self):
        decide(modes.SEGMENTED)
        kv = kv_pools.SegmentedMHATokenToKVPool(
            SIZE, 1, torch.half, 2, 64, 2, "cpu", False
        )
        allocator = kv_allocators.SegmentedTokenToKVPoolAllocator(
            SIZE, kv.dtype, "cpu", kv, False
        )
        buffers = kv.segmented_buffers  # the reservations the segments commit in
        rows = SegmentedReqToTokenPool(4, 100_000, "cpu", False)
        layout = fa3_page_table_layout(4, 100_000, 1)
        graph = LazyGraphBuffer(layout, RUNTIME.backings(layout.reserved_bytes))
        RUNTIME.graph.buffers.append(graph)
        # A request served and finished: 2500 slots written, its row, a replay's table.
        slots = allocator.alloc(2500)
        kv.k_buffer[0][slots] = 1.0
        rows.req_to_token[1, :50_000] = 3
        graph.ensure(GraphBatch(rows=4, seq_lens_sum=4000, max_seq_len=1000))
        allocator.free(slots)
        rows.free_rows([1])  # its whole pages go at once; the one row 0 shares stays
        who = updater(allocator, rows)
        self.assertEqual(buffers.committed_segments, 3)
        self.assertGreater(rows.resident_bytes(), 0)
        self.assertGreater(graph.committed_bytes, 0)

        release(who, GPU_MEMORY_TYPE_CUDA_GRAPH)  # no kv_cache: segmented memory stays
        self.assertEqual(buffers.committed_segments, 3)
        self.assertGreater(graph.committed_bytes, 0)
        resume(who, GPU_MEMORY_TYPE_CUDA_GRAPH)

        release(who, GPU_MEMORY_TYPE_KV_CACHE)
        self.assertIn(("pause", "kv_cache"), who.memory_saver_adapter.calls)
        self.assertEqual(buffers.committed_segments, 0)  # the first segment too
        self.assertEqual(rows.resident_bytes(), 0)
        self.assertEqual(graph.committed_bytes, 0)
        self.assertEqual(memory_release.committed_bytes(who.scheduler), 0)
        self.assertIsNone(allocator.alloc(1))  # requests queue while released

        resume(who, GPU_MEMORY_TYPE_KV_CACHE)
        self.assertEqual(who.offload_tags, set())
        # The padding row and RoPE caches come back before the next batch (a GPU's).
        self.assertTrue(RUNTIME.state.restore_pending)
        self.assertEqual(buffers.committed_segments, 0)  # on demand, not at resume
        slots = allocator.alloc(100)
        self.assertIsNotNone(slots)
        self.assertEqual(buffers.committed_segments, 1)
        self.assertEqual(int(kv.k_buffer[0][slots].count_nonzero()), 0)  # no stale KV
        self.assertGreater(graph.ensure(GraphBatch(4, 400, 100)), 0)

    def test_static_is_upstreams_path(self):
        decide(modes.STATIC)
        allocator = TokenToKVPoolAllocator(SIZE, torch.float16, "cpu", None, False)
        who = updater(allocator, None)
        free = allocator.available_size()
        release(who, GPU_MEMORY_TYPE_KV_CACHE)
        self.assertEqual(
            who.memory_saver_adapter.calls,
            [("pause", GPU_MEMORY_TYPE_KV_CACHE), "flush"],
        )
        self.assertFalse(RUNTIME.state.kv_released)
        self.assertEqual(allocator.available_size(), free)
        self.assertIsNotNone(allocator.alloc(1))
        resume(who, GPU_MEMORY_TYPE_KV_CACHE)
        self.assertEqual(who.memory_saver_adapter.calls[-1], ("resume", "kv_cache"))
        self.assertFalse(RUNTIME.state.restore_pending)


if __name__ == "__main__":
    unittest.main()
