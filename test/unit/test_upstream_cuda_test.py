"""The CUDA backing's upstream-style test (PR 7's, registered for upstream's CUDA CI and
skipped on the CPU) runs here over the fake CUDA driver, which enforces the driver's rules
and reports free memory as the device would: the test's own claims are checked where no
GPU is, and a call it makes that the backing does not have fails here first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEST = REPO / "upstream_tests" / "registered" / "unit" / "mem_cache" / "test_cuda_vmm_kv_backing.py"

# A process of its own: torch.cuda is patched to answer for the fake device.
RUN = """
import sys, unittest
sys.path[:0] = [{support!r}, {folder!r}]
import torch
import sglang.srt.mem_cache.segmented.cuda_backing
import sglang.srt.mem_cache.segmented.cuda_vmm as cuda_vmm
import sglang.test.ci.ci_register, sglang.test.test_utils
from fake_cuda import FakeDriver, FakeVmmApi
driver = FakeDriver(capacity=64 << 30)
torch.cuda.is_available = lambda: True
torch.cuda.init = lambda: None
torch.cuda.synchronize = lambda *a, **k: None
torch.cuda.mem_get_info = lambda *a, **k: (
    driver.capacity - driver.physical_bytes, driver.capacity
)
cuda_vmm.UpstreamVmmApi = lambda device: FakeVmmApi(driver)
import test_cuda_vmm_kv_backing as test
result = unittest.main(module=test, argv=["test"], exit=False).result
sys.exit(0 if result.wasSuccessful() and result.testsRun == 3 and not result.skipped else 1)
"""


def test_the_cuda_registered_upstream_test_passes_over_the_fake_driver() -> None:
    code = RUN.format(support=str(REPO / "test" / "support"), folder=str(TEST.parent))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Ran 3 tests" in out.stderr and "OK" in out.stderr
