"""Where upstream sizes the KV pool, segmented mode opens its backing, refuses in one line
what it cannot serve, and keeps room for what it commits at run time only where static's
context-sized tables are large. CPU only.

    python -m pytest test/registered/unit/mem_cache/test_segmented_mode_decision.py -v
"""

import unittest
from types import SimpleNamespace as NS

import torch

from sglang.srt.mem_cache.segmented import backing_choice, modes, refusals
from sglang.srt.mem_cache.segmented.row_room import (
    CONTEXT_TABLES_MAX_SHARE,
    req_to_token_bytes,
    req_to_token_room,
)
from sglang.srt.mem_cache.segmented.runtime import RUNTIME
from sglang.test.ci.ci_register import register_cpu_ci
from sglang.test.test_utils import CustomTestCase

register_cpu_ci(est_time=5, suite="base-a-test-cpu")

MB = 1 << 20
GRANULE = 2 * MB


class TestSegmentedModeDecision(CustomTestCase):
    def setUp(self):
        RUNTIME.reset()
        self.addCleanup(RUNTIME.reset)

    def test_the_cpu_backing_commits_what_is_written_and_gives_it_back(self):
        factory = backing_choice.open_backings("cpu")
        self.assertIs(backing_choice.open_backings("cpu"), factory)  # one per process
        self.assertTrue(factory.faults_in)  # a first write commits
        backing = factory(256 * MB)
        self.addCleanup(backing.close)
        table = backing.tensor(torch.uint8, (256 * MB,))
        self.assertEqual(backing.reserved_bytes, 256 * MB)
        self.assertEqual(backing.committed_bytes, 0)
        backing.commit(0, 8 * MB)
        table[: 8 * MB].fill_(7)
        self.assertEqual(backing.committed_bytes, 8 * MB)
        backing.release(0, 8 * MB)
        self.assertEqual(backing.committed_bytes, 0)
        self.assertEqual(int(table[: 8 * MB].count_nonzero()), 0)  # reads zeros again

    def test_a_device_without_a_backing_is_refused_in_one_line(self):
        with self.assertRaisesRegex(modes.KvAllocModeError, "no backing for device"):
            backing_choice.open_backings("xpu")

    def test_what_segmented_mode_cannot_serve_is_refused_naming_the_flag(self):
        def configurator(**fields):
            args = dict(
                pp_size=1, enable_dp_attention=False, disaggregation_mode="null"
            )
            return NS(server_args=NS(**{**args, **fields}), device="cuda")

        self.assertIsNone(refusals.unsupported_parallelism(configurator()))
        refused = refusals.unsupported_parallelism(configurator(pp_size=2))
        self.assertIn("--pp-size", refused)
        refused = refusals.unsupported_feature(
            configurator(enable_hierarchical_cache=True), explicit_commits=True
        )
        self.assertIn("--enable-hierarchical-cache", refused)
        refused = refusals.unsupported_feature(
            configurator(disaggregation_mode="decode"), explicit_commits=True
        )
        self.assertIn("--disaggregation-mode decode", refused)
        self.assertIsNone(
            refusals.unsupported_feature(
                configurator(disaggregation_mode="decode"), explicit_commits=False
            )
        )

    def test_the_row_room_comes_out_of_the_kv_budget_only_past_the_share(self):
        pool = 40 * (1 << 30)
        # An ordinary context: upstream's whole table is a small share of the pool, so
        # the KV budget keeps nothing back and the pool is static's size.
        small = req_to_token_bytes(256, 131_072, 4)
        self.assertLess(small, CONTEXT_TABLES_MAX_SHARE * pool)
        room = req_to_token_room(
            max_running_requests=256,
            token_capacity=1_000_000,
            table_bytes=small,
            granularity=GRANULE,
            kv_pool_bytes=pool,
        )
        self.assertEqual(room.in_kv_budget, 0)
        self.assertLessEqual(room.committed_at_most, small + GRANULE)
        # 10M: the table (82 GB) cannot be kept whole; the rows' room is one granule
        # a request and 4 B a token, and what passes the share comes out of the budget.
        huge = req_to_token_bytes(2048, 10_000_000, 4)
        room = req_to_token_room(
            max_running_requests=2048,
            token_capacity=10_000_000,
            table_bytes=huge,
            granularity=GRANULE,
            kv_pool_bytes=pool,
        )
        self.assertEqual(room.committed_at_most, 2048 * GRANULE + 4 * 10_000_000)
        outside = int(CONTEXT_TABLES_MAX_SHARE * pool)
        self.assertEqual(room.in_kv_budget, room.committed_at_most - outside)


if __name__ == "__main__":
    unittest.main()
