"""The CUDA virtual-memory backing of segmented mode on a GPU: address space reserved
without taking memory, uncommitted ranges reading zeros (a shared scratch page),
committed bytes showing in the device's free memory and given back on release, data
kept across other ranges' commits and releases at one fixed address. Skipped without a
CUDA device.

    python -m pytest test/registered/unit/mem_cache/test_cuda_vmm_kv_backing.py -v
"""

import unittest

import torch

from sglang.test.ci.ci_register import register_cuda_ci
from sglang.test.test_utils import CustomTestCase

register_cuda_ci(est_time=20, stage="base-a", runner_config="1-gpu-small")

GIB = 1 << 30
MIB = 1 << 20


def free_bytes() -> int:
    torch.cuda.synchronize()
    return int(torch.cuda.mem_get_info()[0])


@unittest.skipUnless(torch.cuda.is_available(), "needs a CUDA device")
class TestCudaVmmKVBacking(CustomTestCase):
    @classmethod
    def setUpClass(cls):
        from sglang.srt.mem_cache.segmented.cuda_backing import VmmDevice
        from sglang.srt.mem_cache.segmented.cuda_vmm import UpstreamVmmApi

        torch.cuda.init()
        cls.device = VmmDevice(UpstreamVmmApi(0), 0, background_refill=False)

    @classmethod
    def tearDownClass(cls):
        cls.device.close()

    def _backing(self, nbytes: int):
        from sglang.srt.mem_cache.segmented.cuda_backing import CudaVmmBacking

        backing = CudaVmmBacking(nbytes, self.device)
        self.addCleanup(backing.close)
        return backing

    def test_a_large_reservation_takes_no_memory_and_reads_zeros(self):
        before = free_bytes()
        backing = self._backing(16 * GIB)
        tensor = backing.tensor(torch.float32, (16 * GIB // 4,))
        self.assertLess(before - free_bytes(), 64 * MIB)
        probe = tensor[:: 64 * MIB // 4]  # one float per 64 MB, across the whole range
        self.assertEqual(int(probe.count_nonzero()), 0)

    def test_committed_bytes_show_in_free_memory_and_go_back(self):
        g = self.device.granularity
        size = 64 * g
        backing = self._backing(2 * size)
        before = free_bytes()
        backing.commit(0, size)
        self.assertLessEqual(abs((before - free_bytes()) - size), 2 * g)
        backing.release(0, size)
        self.device.trim_spares()
        self.assertLessEqual(abs(before - free_bytes()), 2 * g)

    def test_data_survives_other_ranges_at_one_address(self):
        g = self.device.granularity
        backing = self._backing(16 * g)
        tensor = backing.tensor(torch.int32, (16 * g // 4,))
        address = tensor.data_ptr()
        per = g // 4
        for seg in (0, 2, 5):
            backing.commit(seg * g, g)
            tensor[seg * per : (seg + 1) * per] = seg + 1
        backing.release(2 * g, g)
        backing.commit(7 * g, 2 * g)
        tensor[7 * per : 9 * per] = 8
        backing.release(7 * g, 2 * g)
        torch.cuda.synchronize()
        self.assertEqual(tensor.data_ptr(), address)
        self.assertTrue(bool((tensor[:per] == 1).all()))
        self.assertTrue(bool((tensor[5 * per : 6 * per] == 6).all()))
        self.assertEqual(int(tensor[10 * per : 16 * per].count_nonzero()), 0)


if __name__ == "__main__":
    unittest.main()
