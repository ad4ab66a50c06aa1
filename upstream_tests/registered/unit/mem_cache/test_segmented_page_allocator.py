"""The segmented page allocator over reserved buffers: memory committed a segment at a
time as pages are handed out, released when trailing segments stay empty. CPU only.

    python -m pytest test/registered/unit/mem_cache/test_segmented_page_allocator.py -v
"""

import unittest

import torch

from sglang.srt.mem_cache.segmented.allocator import SegmentedPageAllocator
from sglang.srt.mem_cache.segmented.backing import RangeSet
from sglang.srt.mem_cache.segmented.buffers import SegmentedBuffers
from sglang.srt.mem_cache.segmented.geometry import SegmentGeometry
from sglang.test.ci.ci_register import register_cpu_ci
from sglang.test.test_utils import CustomTestCase

register_cpu_ci(est_time=3, suite="base-a-test-cpu")

GRANULE = 4096


class HostBacking:
    """A host tensor standing in for reserved address space: it records which ranges
    are committed, and a released range reads zeros again, as fresh memory does."""

    granularity = GRANULE

    def __init__(self, nbytes: int):
        self.reserved_bytes = -(-nbytes // GRANULE) * GRANULE
        self.memory = torch.zeros(self.reserved_bytes, dtype=torch.uint8)
        self.committed = RangeSet()

    @property
    def committed_bytes(self) -> int:
        return self.committed.total

    def tensor(self, dtype, shape):
        return self.memory.view(dtype)[: torch.Size(shape).numel()].view(shape)

    def commit(self, offset, nbytes, *, unused=False):
        assert offset % GRANULE == 0 and nbytes % GRANULE == 0
        self.committed.add(offset, offset + nbytes)

    def release(self, offset, nbytes, *, unused=False):
        self.committed.remove(offset, offset + nbytes)
        self.memory[offset : offset + nbytes] = 0

    def close(self):
        self.committed = RangeSet()


class TestSegmentedPageAllocator(CustomTestCase):
    def _allocator(self, clock):
        # 4 segments of 1024 tokens, one page per token, 4 KiB rows (a granule each).
        geometry = SegmentGeometry(4096, 1024, 1)
        self.buffers = SegmentedBuffers(
            geometry, [HostBacking(4096 * GRANULE)], [GRANULE]
        )
        return SegmentedPageAllocator(
            geometry,
            on_commit=self.buffers.commit_segment,
            on_release=self.buffers.release_segment,
            hold_off_s=5.0,
            clock=clock,
            debug=True,
        )

    def test_commits_as_pages_are_handed_out(self):
        allocator = self._allocator(clock=lambda: 0.0)
        self.assertEqual(self.buffers.committed_segments, 1)
        self.assertEqual(self.buffers.backings[0].committed_bytes, 1024 * GRANULE)
        pages = allocator.alloc(2500)
        self.assertIsNotNone(pages)
        self.assertEqual(self.buffers.committed_segments, 3)
        self.assertEqual(int(pages.min()), 1)  # page 0 is the padding slot
        self.assertEqual(len(set(pages.tolist())), 2500)
        allocator.check_invariants()

    def test_trailing_empty_segments_are_released_after_the_hold_off(self):
        now = [0.0]
        allocator = self._allocator(clock=lambda: now[0])
        pages = allocator.alloc(3000)
        allocator.free(pages)
        self.assertEqual(allocator.maybe_shrink(now=1.0), 0)  # within the hold-off
        self.assertEqual(self.buffers.committed_segments, 3)
        now[0] = 10.0
        self.assertEqual(allocator.maybe_shrink(now=10.0), 2)
        self.assertEqual(self.buffers.committed_segments, 1)  # segment 0 stays
        self.assertEqual(self.buffers.backings[0].committed_bytes, 1024 * GRANULE)
        allocator.check_invariants()

    def test_the_pool_never_hands_out_more_than_it_holds(self):
        allocator = self._allocator(clock=lambda: 0.0)
        self.assertIsNone(
            allocator.alloc(4096)
        )  # the padding page is not a page to use
        self.assertIsNotNone(allocator.alloc(4095))
        self.assertIsNone(allocator.alloc(1))
        allocator.check_invariants()


if __name__ == "__main__":
    unittest.main()
