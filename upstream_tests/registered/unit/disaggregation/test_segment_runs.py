"""Slots handed out under PD, where the KV pool is registered with the transfer engine one
committed segment at a time: no run of consecutive slots crosses a segment start (the
engine moves a run as one block, and a block must lie in one registered range). CPU only.

    python -m pytest test/registered/unit/disaggregation/test_segment_runs.py -v
"""

import unittest

import torch

from sglang.srt.mem_cache.segmented.runs import split_runs_at_segment_starts
from sglang.test.ci.ci_register import register_cpu_ci
from sglang.test.test_utils import CustomTestCase

register_cpu_ci(est_time=2, suite="base-a-test-cpu")


def _crossings(pages: torch.Tensor, segment_pages: int) -> int:
    steps = pages[1:] - pages[:-1]
    return int(((steps == 1) & (pages[1:] % segment_pages == 0)).sum())


class TestSegmentRuns(CustomTestCase):
    def test_no_run_crosses_a_segment_start(self):
        generator = torch.Generator().manual_seed(0)
        for segment_pages in (3, 4, 64, 1024):
            for _ in range(50):
                start = int(
                    torch.randint(1, 4 * segment_pages, (1,), generator=generator)
                )
                length = int(
                    torch.randint(1, 3 * segment_pages, (1,), generator=generator)
                )
                pages = torch.arange(start, start + length, dtype=torch.int64)
                out = split_runs_at_segment_starts(pages, segment_pages)
                self.assertEqual(_crossings(out, segment_pages), 0)
                self.assertTrue(torch.equal(out.sort().values, pages))  # the same slots

    def test_pages_without_a_crossing_are_handed_out_as_they_are(self):
        pages = torch.tensor([5, 9, 10, 11, 40], dtype=torch.int64)
        self.assertIs(split_runs_at_segment_starts(pages, 16), pages)

    def test_a_run_ending_at_a_segment_start_keeps_every_slot(self):
        pages = torch.tensor([14, 15, 16], dtype=torch.int64)
        out = split_runs_at_segment_starts(pages, 16)
        self.assertEqual(_crossings(out, 16), 0)
        self.assertEqual(sorted(out.tolist()), [14, 15, 16])


if __name__ == "__main__":
    unittest.main()
