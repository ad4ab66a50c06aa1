"""One KV budget shared by the segmented servers of a device (``--kv-budget``): a server
reserves in the device's ledger before it commits KV memory and gives the bytes back after
it released them; a refusal is a failed commit, and another server's floor is kept.

CPU only: ledgers in a temporary directory, a segmented pool's CPU reservation.

    python -m pytest test/registered/unit/mem_cache/test_kv_shared_budget.py -v
"""

import contextlib
import io
import os
import tempfile
import unittest
from pathlib import Path

import torch

from sglang.srt.mem_cache.segmented.cpu_backing import CpuBackingFactory
from sglang.srt.mem_cache.segmented.shared_budget import (
    BudgetError,
    SharedBudget,
    ledger_path,
)
from sglang.srt.plugins import load_plugins
from sglang.srt.server_args import prepare_server_args
from sglang.test.ci.ci_register import register_cpu_ci
from sglang.test.test_utils import CustomTestCase

register_cpu_ci(est_time=2, suite="base-a-test-cpu")

MIB = 1 << 20


class TestKvSharedBudget(CustomTestCase):
    @classmethod
    def setUpClass(cls):
        load_plugins()  # as launch_server does before it parses the command line

    def setUp(self):
        self._dir = tempfile.TemporaryDirectory()
        self.directory = Path(self._dir.name)

    def tearDown(self):
        self._dir.cleanup()

    def _ledger(self, name):
        return ledger_path("cpu-test", name, self.directory)

    def test_commits_are_reserved_first_and_given_back_after(self):
        budget = SharedBudget(self._ledger("kv"), total=8 * MIB, name="server-a")
        factory = CpuBackingFactory()
        factory.budget = budget
        backing = factory(16 * MIB)
        backing.commit(0, 4 * MIB)
        self.assertEqual(budget.snapshot()["committed_bytes"], 4 * MIB)
        with self.assertRaises(MemoryError):
            backing.commit(8 * MIB, 8 * MIB)  # more than the budget has left
        self.assertEqual(backing.committed_bytes, 4 * MIB)  # nothing changed
        backing.release(0, backing.granularity)
        self.assertEqual(
            budget.snapshot()["committed_bytes"], 4 * MIB - backing.granularity
        )
        view = backing.tensor(torch.uint8, (backing.granularity,))
        del view
        backing.close()
        self.assertEqual(budget.snapshot()["committed_bytes"], 0)
        budget.close()

    def test_another_servers_floor_is_kept(self):
        path = self._ledger("floors")
        other = SharedBudget(
            path, total=10 * MIB, name="server-b", floor=4 * MIB, pid=os.getppid()
        )
        mine = SharedBudget(path, total=None, name="server-a")
        self.assertTrue(mine.reserve(6 * MIB))
        self.assertFalse(mine.reserve(1 * MIB))  # the rest is the other's floor
        self.assertTrue(other.reserve(4 * MIB))
        mine.release(6 * MIB)
        self.assertEqual(mine.snapshot()["committed_bytes"], 4 * MIB)
        mine.close()
        other.close()

    def test_a_second_size_for_one_budget_is_refused(self):
        path = self._ledger("sizes")
        first = SharedBudget(path, total=8 * MIB, name="server-a")
        with self.assertRaises(BudgetError):
            SharedBudget(path, total=16 * MIB, name="server-b", pid=os.getppid())
        self.assertEqual(SharedBudget.total_of(path), 8 * MIB)
        first.close()

    def test_the_flags_parse_and_a_budget_needs_memory_committed_on_demand(self):
        args = prepare_server_args(
            ["--model-path", "unused", "--kv-budget", "gpu0", "--kv-budget-bytes", "8G"]
        )
        self.assertEqual((args.kv_budget, args.kv_budget_bytes), ("gpu0", 8 << 30))
        err = io.StringIO()
        with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as exit_:
            prepare_server_args(
                [
                    "--model-path",
                    "unused",
                    "--kv-alloc-mode",
                    "static",
                    "--kv-budget",
                    "gpu0",
                ]
            )
        self.assertEqual(exit_.exception.code, 2)
        self.assertIn("--kv-budget", err.getvalue())
        self.assertIn("committed on demand", err.getvalue())


if __name__ == "__main__":
    unittest.main()
