"""Segmented mode's context-scaled tables on the CPU: req_to_token is reserved at its full
size (max requests x context) and only the rows requests write hold memory (an mmap whose
pages a first write commits, measured with mincore), a freed row gives its pages back, and
the table reads as upstream's does; the RoPE cache grows with the positions in use instead
of being expanded to the context. Static mode keeps upstream's own. CPU only.

    python -m pytest test/registered/unit/mem_cache/test_lazy_req_to_token.py -v
"""

import ctypes
import mmap
import types
import unittest
from unittest import mock

import numpy as np
import torch

from sglang.srt import runtime_context
from sglang.srt.kvalloc.upstream.lazy_req_to_token import SegmentedReqToTokenPool
from sglang.srt.kvalloc.upstream.req_pool_builders import segmented_default_req_pool
from sglang.srt.kvalloc.upstream.runtime import RUNTIME
from sglang.srt.layers.rotary_embedding import base
from sglang.srt.mem_cache import kv_cache_configurator
from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
from sglang.srt.mem_cache.segmented import modes
from sglang.srt.plugins import load_plugins
from sglang.srt.utils import common
from sglang.test.ci.ci_register import register_cpu_ci
from sglang.test.test_utils import CustomTestCase

register_cpu_ci(est_time=15, suite="base-a-test-cpu")

MB = 1 << 20
CONTEXT = 10_000_000  # 40 MB a row: 9 rows are 360 MB of address space
NS = types.SimpleNamespace


def _resident(tensor: torch.Tensor) -> int:
    """Bytes of a host tensor's range resident in memory (mincore(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    nbytes = tensor.numel() * tensor.element_size()
    vec = (ctypes.c_ubyte * -(-nbytes // mmap.PAGESIZE))()
    ptr, size = ctypes.c_void_p(tensor.data_ptr()), ctypes.c_size_t(nbytes)
    assert libc.mincore(ptr, size, vec) == 0
    return int((np.frombuffer(vec, dtype=np.uint8) & 1).sum()) * mmap.PAGESIZE


class _Kv:
    def __init__(self):
        self.req_pool_idx, self.kv_allocated_len = None, 0

    @property
    def holds_kv(self) -> bool:
        return self.req_pool_idx is not None


class TestLazyReqToToken(CustomTestCase):
    @classmethod
    def setUpClass(cls):
        load_plugins()  # as launch_server does: the plugin's hooks, where it is one

    def setUp(self):
        RUNTIME.reset()
        self.addCleanup(RUNTIME.reset)
        bag = NS(features=NS(enable_memory_saver=False))
        for owner in (runtime_context, kv_cache_configurator):
            patcher = mock.patch.object(owner, "get_exec", lambda: bag)
            patcher.start()
            self.addCleanup(patcher.stop)

    def _mode(self, mode: str) -> None:
        """What the scheduler notes (the mode asked for) and the decision made."""
        RUNTIME.device = "cpu"
        RUNTIME.request = modes.KvAllocRequest(mode, None, 5.0, 8192, None)
        backing = modes.CPU_MMAP if mode == modes.SEGMENTED else modes.NO_BACKING
        RUNTIME.decide(modes.ModeDecision(mode, mode, "the test", "mha", None, backing))

    def _build(self, reqs: int, context: int, draft: bool = False):
        self.configurator = NS(
            is_draft_worker=draft, device="cpu", model_config=NS(context_len=context)
        )
        return KVCacheConfigurator._build_default_req_pool(
            self.configurator, max_num_reqs=reqs, extra_max_context_len=0
        )

    def test_static_and_draft_workers_get_upstreams_table(self):
        for mode, draft in ((None, False), (modes.STATIC, False), (modes.SEGMENTED, True)):
            RUNTIME.reset()
            if mode is not None:
                self._mode(mode)
            pool = self._build(4, 64, draft)
            self.assertIs(type(pool), ReqToTokenPool, mode)
            kwargs = dict(max_num_reqs=4, extra_max_context_len=0)
            self.assertIsNone(segmented_default_req_pool(self.configurator, **kwargs))

    def test_the_table_is_reserved_whole_and_rows_hold_what_is_written(self):
        self._mode(modes.SEGMENTED)
        pool = self._build(8, CONTEXT)
        self.assertIsInstance(pool, SegmentedReqToTokenPool)
        table = pool.req_to_token
        self.assertEqual((table.shape, table.dtype), ((9, CONTEXT), torch.int32))
        self.assertLess(_resident(table), 1 * MB)  # of 360 MB
        reqs = [NS(kv=_Kv()) for _ in range(3)]
        rows = pool.alloc(reqs)
        locs = torch.arange(1, 300_001, dtype=torch.int32)  # 1.2 MB of one row
        pool.write((rows[0], slice(0, len(locs))), locs)
        self.assertTrue(torch.equal(table[rows[0], : len(locs)], locs))
        written = _resident(table)
        self.assertTrue(1 * MB < written < 3 * MB, written)
        pool.free(reqs[0])
        self.assertIn(rows[0], pool.free_slots)
        self.assertLess(_resident(table), written - 1 * MB)  # its pages went back
        self.assertEqual(int(table[rows[0], 1024 : len(locs)].count_nonzero()), 0)

    def test_the_table_reads_as_upstreams_does(self):
        self._mode(modes.SEGMENTED)
        lazy, plain = self._build(4, 65536), ReqToTokenPool(4, 65536, "cpu", False)
        self.assertEqual(lazy.req_to_token.shape, plain.req_to_token.shape)
        self.assertEqual(lazy.req_to_token.dtype, plain.req_to_token.dtype)
        pairs = []
        for n in (5000, 70, 30_000, 900):  # the second request ends before the fourth
            reqs = [NS(kv=_Kv()), NS(kv=_Kv())]
            for pool, req in zip((lazy, plain), reqs):
                pool.alloc([req])
                pool.write((req.kv.req_pool_idx, slice(0, n)), torch.arange(n) + 7)
            pairs.append((n, reqs))
            if n == 70:
                lazy.free(reqs[0])
                plain.free(reqs[1])
        self.assertEqual(sorted(lazy.free_slots), sorted(plain.free_slots))
        self.assertEqual(lazy.available_size(), plain.available_size())
        self.assertTrue(torch.equal(lazy.req_to_token[0], plain.req_to_token[0]))
        for n, (ours, theirs) in pairs[2:] + pairs[:1]:  # the rows still held
            got = lazy.req_to_token[ours.kv.req_pool_idx, :n]
            self.assertTrue(torch.equal(got, plain.req_to_token[theirs.kv.req_pool_idx, :n]))

    def test_the_rope_cache_grows_with_the_positions_in_use(self):
        spec = NS(speculative_num_steps=0, speculative_num_draft_tokens=0)
        mock.patch.object(common, "get_model", lambda: NS(context_length=None)).start()
        mock.patch.object(common, "get_spec", lambda: spec).start()
        self.addCleanup(mock.patch.stopall)
        config = NS(context_len=100_000, hf_text_config=NS(max_position_embeddings=4096))
        with mock.patch.object(base, "_is_cpu", True):  # the CPU engine's module
            ropes = {m: base.RotaryEmbedding(64, 64, 4096, 1e4, True, torch.float32)
                     for m in (modes.STATIC, modes.SEGMENTED)}  # fmt: skip
        for mode, rope in ropes.items():
            RUNTIME.reset()
            self._mode(mode)
            common.reserve_rope_cache_for_long_sequences(NS(children=lambda: [rope]), config)
        upstream, lazy = ropes[modes.STATIC], ropes[modes.SEGMENTED]
        self.assertGreaterEqual(upstream.cos_sin_cache.shape[0], 100_000)
        self.assertEqual(lazy.cos_sin_cache.shape[0], 4096)  # the model's own length
        positions, q, k = torch.tensor([5, 20_000]), torch.randn(2, 64), torch.randn(2, 64)
        got = lazy.forward_native(positions, q.clone(), k.clone())
        rows = lazy.cos_sin_cache.shape[0]
        self.assertTrue(20_000 < rows < 100_000, rows)
        self.assertTrue(torch.equal(lazy.cos_sin_cache, upstream.cos_sin_cache[:rows]))
        want = upstream.forward_native(positions, q.clone(), k.clone())
        self.assertTrue(all(map(torch.equal, got, want)))


if __name__ == "__main__":
    unittest.main()
