"""Segmented mode's req_to_token on the CPU: reserved at its full size (max requests x
context) and only the rows requests write hold memory (an mmap whose pages a first write
commits, measured with mincore), a freed row gives its pages back, and the table reads as
upstream's does. Static mode keeps upstream's own. CPU only.

    python -m pytest test/registered/unit/mem_cache/test_lazy_req_to_token.py -v
"""

import unittest
from types import SimpleNamespace as NS
from unittest import mock

import torch

from sglang.srt import runtime_context
from sglang.srt.managers.schedule_batch import ReqKvInfo
from sglang.srt.mem_cache import kv_cache_configurator
from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
from sglang.srt.mem_cache.segmented import modes
from sglang.srt.mem_cache.segmented.lazy_req_to_token import SegmentedReqToTokenPool
from sglang.srt.mem_cache.segmented.req_pool_builders import segmented_default_req_pool
from sglang.srt.mem_cache.segmented.runtime import RUNTIME
from sglang.srt.plugins import load_plugins
from sglang.test.ci.ci_register import register_cpu_ci
from sglang.test.test_utils import CustomTestCase

register_cpu_ci(est_time=15, suite="base-a-test-cpu")

MB = 1 << 20
CONTEXT = 10_000_000  # 40 MB a row: 9 rows are 360 MB of address space


class TestLazyReqToToken(CustomTestCase):
    @classmethod
    def setUpClass(cls):
        load_plugins()  # as launch_server does: the plugin's hooks, where it is one

    def setUp(self):
        RUNTIME.reset()
        self.addCleanup(RUNTIME.reset)
        bag = NS(features=NS(enable_memory_saver=False))
        self._patch((runtime_context, kv_cache_configurator), "get_exec", lambda: bag)

    def _patch(self, owners, name: str, value) -> None:
        for owner in owners:
            patcher = mock.patch.object(owner, name, value)
            patcher.start()
            self.addCleanup(patcher.stop)

    def _mode(self, mode: str) -> None:
        """What the scheduler notes (the mode asked for), then the decision."""
        RUNTIME.device = "cpu"
        RUNTIME.request = modes.read_request(NS(kv_alloc_mode=mode))
        backing = modes.CPU_MMAP if mode == modes.SEGMENTED else modes.NO_BACKING
        RUNTIME.decide(modes.ModeDecision(mode, mode, "test", "mha", backing=backing))

    def _build(self, reqs: int, context: int, draft: bool = False):
        self.kwargs = dict(max_num_reqs=reqs, extra_max_context_len=0)
        self.conf = NS(
            is_draft_worker=draft, device="cpu", model_config=NS(context_len=context)
        )
        return KVCacheConfigurator._build_default_req_pool(self.conf, **self.kwargs)

    def test_static_and_draft_workers_get_upstreams_table(self):
        for mode, draft in ((None, 0), (modes.STATIC, 0), (modes.SEGMENTED, 1)):
            RUNTIME.reset()
            if mode is not None:
                self._mode(mode)
            pool = self._build(4, 64, draft)
            self.assertIs(type(pool), ReqToTokenPool, mode)
            built = segmented_default_req_pool(self.conf, **self.kwargs)
            self.assertIsNone(built)  # upstream builds its own

    def test_the_table_is_reserved_whole_and_rows_hold_what_is_written(self):
        self._mode(modes.SEGMENTED)
        pool = self._build(8, CONTEXT)
        self.assertIsInstance(pool, SegmentedReqToTokenPool)
        table = pool.req_to_token
        self.assertEqual((table.shape, table.dtype), ((9, CONTEXT), torch.int32))
        self.assertLess(pool.resident_bytes(), 1 * MB)  # of 360 MB
        reqs = [NS(kv=ReqKvInfo()) for _ in range(3)]
        rows = pool.alloc(reqs)
        locs = torch.arange(1, 300_001, dtype=torch.int32)  # 1.2 MB of one row
        pool.write((rows[0], slice(0, len(locs))), locs)
        written = pool.resident_bytes()
        self.assertTrue(1 * MB < written < 3 * MB, written)
        pool.free(reqs[0])
        self.assertLess(pool.resident_bytes(), written - 1 * MB)  # its pages went back
        self.assertEqual(int(table[rows[0], 1024 : len(locs)].count_nonzero()), 0)

    @staticmethod
    def _serve(pool) -> dict:
        """Requests of 5000, 70 and 900 tokens, the 70 done before the 900 comes: rows."""
        rows = {}
        for n in (5000, 70, 900):
            req = NS(kv=ReqKvInfo())
            rows[n] = pool.alloc([req])[0]
            pool.write((rows[n], slice(0, n)), torch.arange(n) + 7)
            if n == 70:
                pool.free(req)
        return rows

    def test_the_table_reads_as_upstreams_does(self):
        self._mode(modes.SEGMENTED)
        lazy, plain = self._build(4, 65536), ReqToTokenPool(4, 65536, "cpu", False)
        ours, theirs = self._serve(lazy), self._serve(plain)
        ours_t, theirs_t = lazy.req_to_token, plain.req_to_token
        self.assertEqual((ours_t.shape, ours_t.dtype), (theirs_t.shape, theirs_t.dtype))
        self.assertEqual(sorted(lazy.free_slots), sorted(plain.free_slots))
        self.assertEqual(ours[900], ours[70])  # the freed row is handed out again
        self.assertTrue(torch.equal(ours_t[0], theirs_t[0]))  # the padding row
        # Rows read whole (zeros past what was written), the reused one as far as its new
        # request wrote (upstream's keeps stale values past that).
        self.assertTrue(torch.equal(ours_t[ours[5000]], theirs_t[theirs[5000]]))
        got, want = ours_t[ours[900], :900], theirs_t[theirs[900], :900]
        self.assertTrue(torch.equal(got, want))


if __name__ == "__main__":
    unittest.main()
