"""The segmented MHA KV pool and its token allocator: upstream's pool and allocator with
the KV buffers on reserved memory, committed a segment at a time ahead of the scheduler's
iteration and given back once empty, under upstream's allocator contract. Upstream's pool
builder gets the segmented class in segmented mode only. CPU only: an mmap reservation
(its pages committed by the first write) stands in for device memory.

    python -m pytest test/registered/unit/mem_cache/test_segmented_kv_pool.py -v
"""

import unittest
from types import SimpleNamespace as NS

import torch

from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.mem_cache.segmented import modes
from sglang.srt.mem_cache.segmented.kv_allocators import (
    SegmentedTokenToKVPoolAllocator,
)
from sglang.srt.mem_cache.segmented.kv_pool_builders import segmented_mha_pool_class
from sglang.srt.mem_cache.segmented.kv_pools import SegmentedMHATokenToKVPool
from sglang.srt.mem_cache.segmented.runtime import RUNTIME
from sglang.srt.plugins import load_plugins
from sglang.test.ci.ci_register import register_cpu_ci
from sglang.test.test_utils import CustomTestCase

register_cpu_ci(est_time=5, suite="base-a-test-cpu")

SIZE, HEADS, HEAD_DIM, LAYERS = 8192, 2, 64, 2
SEGMENT = 1024  # tokens per segment: 8 segments


class TestSegmentedKVPool(CustomTestCase):
    @classmethod
    def setUpClass(cls):
        load_plugins()  # as launch_server does: the plugin's hooks, where it is one

    def setUp(self):
        RUNTIME.reset()
        self.addCleanup(RUNTIME.reset)

    def _mode(self, mode: str) -> None:
        RUNTIME.device = "cpu"
        RUNTIME.request = modes.read_request(NS(kv_alloc_mode=mode))
        backing = modes.CPU_MMAP if mode == modes.SEGMENTED else modes.NO_BACKING
        RUNTIME.decide(modes.ModeDecision(mode, mode, "test", "mha", backing=backing))
        RUNTIME.settings.segment_tokens = SEGMENT
        RUNTIME.settings.hold_off_s = 0.0

    def _pool(self):
        pool = SegmentedMHATokenToKVPool(
            SIZE, 1, torch.float32, HEADS, HEAD_DIM, LAYERS, "cpu", False
        )
        allocator = SegmentedTokenToKVPoolAllocator(
            SIZE, torch.float32, "cpu", pool, False
        )
        return pool, allocator

    def test_upstreams_builder_gets_the_segmented_class_in_segmented_mode_only(self):
        conf = NS(is_draft_worker=False)
        for mode, expected in (
            (modes.STATIC, MHATokenToKVPool),
            (modes.SEGMENTED, SegmentedMHATokenToKVPool),
        ):
            RUNTIME.reset()
            self._mode(mode)
            chosen = segmented_mha_pool_class(conf, mha_pool_class=MHATokenToKVPool)
            self.assertIs(chosen, expected, mode)

    def test_buffers_are_reserved_whole_and_committed_a_segment_at_a_time(self):
        self._mode(modes.SEGMENTED)
        pool, allocator = self._pool()
        self.assertIsInstance(pool, MHATokenToKVPool)
        self.assertIsInstance(allocator, TokenToKVPoolAllocator)
        self.assertEqual(pool.k_buffer[0].shape, (SIZE + 1, HEADS, HEAD_DIM))
        buffers = pool.segmented_buffers
        self.assertEqual(buffers.committed_segments, 1)
        start = buffers.committed_bytes
        # The scheduler plans up to the cap: uncommitted segments count as available.
        self.assertEqual(allocator.available_size(), SIZE)

        allocator.scheduler_step(3 * SEGMENT)  # the commit-ahead of one iteration
        slots = allocator.alloc(3 * SEGMENT)
        self.assertIsNotNone(slots)
        self.assertGreaterEqual(buffers.committed_segments, 3)
        self.assertGreater(buffers.committed_bytes, start)
        self.assertEqual(allocator.available_size(), SIZE - 3 * SEGMENT)

        # The KV reads back as written, through upstream's buffers at fixed addresses.
        address = pool.k_buffer[1].data_ptr()
        pool.k_buffer[1][slots] = 1.5
        self.assertTrue(bool((pool.k_buffer[1][slots] == 1.5).all()))
        self.assertEqual(pool.k_buffer[1].data_ptr(), address)

        allocator.free(slots)
        self.assertGreater(allocator.maybe_shrink(), 0)
        self.assertEqual(buffers.committed_bytes, start)
        self.assertEqual(allocator.available_size(), SIZE)

    def test_the_pool_never_hands_out_more_than_it_holds(self):
        self._mode(modes.SEGMENTED)
        _, allocator = self._pool()
        allocator.scheduler_step(SIZE)
        self.assertIsNotNone(allocator.alloc(SIZE))
        self.assertIsNone(allocator.alloc(1))  # full: upstream retracts or queues


if __name__ == "__main__":
    unittest.main()
