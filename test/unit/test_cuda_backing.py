"""The CUDA VMM backing through a fake driver with the real driver's rules (no GPU here).

`test/support/fake_cuda.py` keeps device memory in host memfds mapped with the same aliasing, access
and refcount rules; an address without access is a real fault. What a real GPU adds (timings,
graph replays, kernels over VMM memory) is in `test/gpu/`.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from fake_cuda import INVALID_VALUE, MIB, OUT_OF_MEMORY, SUCCESS, FakeDriver, FakeVmmApi
from sglang.srt.mem_cache.segmented.allocator import SegmentedPageAllocator
from sglang.srt.mem_cache.segmented.backing import Backing, BackingUnavailableError
from sglang.srt.mem_cache.segmented.buffers import SegmentedBuffers
from sglang.srt.mem_cache.segmented.cuda_backing import CudaVmmBacking, VmmDevice
from sglang.srt.mem_cache.segmented.geometry import SegmentGeometry

G = 2 * MIB  # the fake's RECOMMENDED granularity (its MINIMUM is 64 KiB)


def make_device(**driver_kwargs) -> tuple[VmmDevice, FakeVmmApi]:
    api = FakeVmmApi(FakeDriver(**driver_kwargs))
    return VmmDevice(api, 0, background_refill=False), api


# -- the fake itself keeps the driver's rules ------------------------------------------------


def test_fake_driver_rules() -> None:
    drv = FakeDriver()
    err, va = drv.cuMemAddressReserve(8 * MIB, G, 0, 0)
    assert err == SUCCESS and va % G == 0
    prop = FakeVmmApi(drv).allocation_prop(0)
    assert drv.cuMemCreate(100_000, prop, 0)[0] == INVALID_VALUE  # not a granularity multiple
    _, h = drv.cuMemCreate(2 * MIB, prop, 0)
    assert drv.cuMemMap(va + 1024, 2 * MIB, 0, h, 0)[0] == INVALID_VALUE  # misaligned
    assert drv.cuMemMap(va, MIB, 0, h, 0)[0] == INVALID_VALUE  # part of a handle
    assert drv.cuMemMap(va, 2 * MIB, 0, h, 0)[0] == SUCCESS
    assert drv.cuMemMap(va, 2 * MIB, 0, h, 0)[0] == INVALID_VALUE  # over a mapped range
    assert drv.cuMemUnmap(va, MIB)[0] == INVALID_VALUE  # part of a mapping
    assert drv.cuMemSetAccess(va, 4 * MIB, [object()], 1)[0] == INVALID_VALUE  # a hole
    assert drv.cuMemAddressFree(va, 8 * MIB)[0] == INVALID_VALUE  # still mapped
    # One handle at two addresses aliases; the memory lives until released and unmapped.
    assert drv.cuMemMap(va + 4 * MIB, 2 * MIB, 0, h, 0)[0] == SUCCESS
    desc = [FakeVmmApi(drv).access_desc(0)]
    assert drv.cuMemSetAccess(va, 2 * MIB, desc, 1)[0] == SUCCESS
    assert drv.cuMemSetAccess(va + 4 * MIB, 2 * MIB, desc, 1)[0] == SUCCESS
    a = FakeVmmApi(drv).tensor_over(va, 2 * MIB, torch.uint8, (2 * MIB,), owner=None)
    b = FakeVmmApi(drv).tensor_over(va + 4 * MIB, 2 * MIB, torch.uint8, (2 * MIB,), owner=None)
    a[123] = 7
    assert int(b[123]) == 7
    assert drv.cuMemRelease(h)[0] == SUCCESS
    assert drv.physical_bytes == 2 * MIB  # released but still mapped
    assert drv.cuMemUnmap(va, 2 * MIB)[0] == SUCCESS
    assert drv.cuMemUnmap(va + 4 * MIB, 2 * MIB)[0] == SUCCESS
    assert drv.physical_bytes == 0
    with pytest.raises(AssertionError, match="unknown handle"):
        drv.cuMemRelease(h)  # undefined behaviour on the real driver: a bug
    assert drv.cuMemAddressFree(va, 8 * MIB)[0] == SUCCESS
    small = FakeDriver(capacity=4 * MIB)
    small.cuMemCreate(4 * MIB, prop, 0)
    assert small.cuMemCreate(2 * MIB, prop, 0)[0] == OUT_OF_MEMORY


_FAULT = """
import sys
sys.path.insert(0, {test_dir!r})
from fake_cuda import FakeDriver, FakeVmmApi, MIB
import torch
api = FakeVmmApi(FakeDriver())
drv = api.driver
_, va = drv.cuMemAddressReserve(2 * MIB, 2 * MIB, 0, 0)
_, h = drv.cuMemCreate(2 * MIB, api.allocation_prop(0), 0)
drv.cuMemMap(va, 2 * MIB, 0, h, 0)
if {set_access}:
    drv.cuMemSetAccess(va, 2 * MIB, [api.access_desc(0)], 1)
t = api.tensor_over(va, 2 * MIB, torch.uint8, (2 * MIB,), owner=None)
print("read", int(t[5]), flush=True)
"""


@pytest.mark.parametrize("set_access", [True, False])
def test_access_before_set_access_faults(set_access: bool) -> None:
    """As on a GPU, touching mapped memory without access kills the process."""
    code = textwrap.dedent(
        _FAULT.format(test_dir=str(Path(__file__).parent.parent / "support"), set_access=set_access)
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if set_access:
        assert result.returncode == 0 and "read 0" in result.stdout, result.stderr
    else:
        assert result.returncode < 0  # SIGSEGV
        assert "read" not in result.stdout


# -- the backing -----------------------------------------------------------------------------


def test_reservation_costs_only_the_scratch_granule_and_reads_zeros() -> None:
    device, api = make_device()
    drv = api.driver
    before = drv.physical_bytes
    assert before == G  # the scratch handle
    b = CudaVmmBacking(64 * MIB, device)
    assert isinstance(b, Backing)
    assert drv.physical_bytes == before  # 64 MB reserved, nothing committed
    assert b.reserved_bytes == 64 * MIB and b.committed_bytes == 0
    t = b.tensor(torch.float32, (16 * MIB,))
    assert int(t.count_nonzero()) == 0  # every granule reads the scratch page
    assert t.data_ptr() == b.address


def test_commit_release_and_data_of_other_ranges() -> None:
    device, api = make_device()
    drv = api.driver
    b = CudaVmmBacking(16 * MIB, device)
    t = b.tensor(torch.int32, (4 * MIB,))  # 16 MB of int32
    per = G // 4
    b.commit(0, G)
    b.commit(2 * G, 2 * G)
    assert b.committed_bytes == 3 * G and drv.physical_bytes == 4 * G  # + scratch
    t[:per] = 1
    t[2 * per : 4 * per] = 3
    # A stray write into an uncommitted granule lands on the scratch page: nothing faults.
    b.commit(6 * G, G)
    t[6 * per : 7 * per] = 6
    b.release(6 * G, G)  # other ranges keep their data
    assert int(t[:per].sum()) == per and int(t[2 * per : 4 * per].unique().item()) == 3
    assert int(t[6 * per : 7 * per].count_nonzero()) == 0  # released: scratch again
    with pytest.raises(ValueError, match="cannot unmap part"):
        b.release(2 * G, G)  # half of the 2-granule mapping
    with pytest.raises(ValueError, match="overlaps committed ranges partly"):
        b.commit(3 * G, 2 * G)
    b.commit(2 * G, 2 * G)  # exactly a committed range: a no-op
    b.release(0, 16 * MIB)
    assert b.committed_bytes == 0
    assert drv.physical_bytes == G  # only the scratch handle is left
    assert api.syncs > 0
    # Every mapping change came after a synchronize.
    events = [e[0] for e in drv.log]
    assert events.count("unmap") >= 3


def test_a_commit_failing_halfway_leaks_nothing_and_hands_out_nothing() -> None:
    device, api = make_device()
    drv = api.driver
    b = CudaVmmBacking(8 * MIB, device)
    t = b.tensor(torch.uint8, (8 * MIB,))
    handles = drv.live_handles
    # Out of memory: torch's cache is given back once (reclaim), then the failure is final.
    drv.fail_next("cuMemCreate", OUT_OF_MEMORY, times=2)
    with pytest.raises(MemoryError):
        b.commit(0, G)
    assert api.reclaims == 1
    assert b.committed_bytes == 0 and drv.live_handles == handles
    # After the scratch unmap: the map fails; the scratch mappings come back and it is a
    # failed commit (MemoryError: the allocator's withhold logic handles it), not a crash.
    drv.fail_next("cuMemMap", INVALID_VALUE)
    with pytest.raises(MemoryError, match="INVALID_VALUE"):
        b.commit(0, G)
    assert b.committed_bytes == 0 and drv.live_handles == handles
    assert int(t[: 2 * G].count_nonzero()) == 0  # mapped and readable: scratch again
    drv.fail_next("cuMemSetAccess", INVALID_VALUE)
    with pytest.raises(MemoryError, match="INVALID_VALUE"):
        b.commit(0, G)
    assert b.committed_bytes == 0 and drv.live_handles == handles
    b.release(0, G)  # releasing what a failed commit left: nothing to do
    b.commit(0, G)  # and the range commits fine afterwards
    t[:10] = 9
    assert int(t[:10].sum()) == 90


def test_close_with_live_views_frees_the_range_with_the_last_view() -> None:
    device, api = make_device()
    drv = api.driver
    b = CudaVmmBacking(4 * MIB, device)
    t = b.tensor(torch.uint8, (4 * MIB,))
    view = t[G:]
    b.commit(0, G)
    t[:4] = 5
    reservations = len(drv.reservations)
    b.close()
    assert b.committed_bytes == 0 and drv.physical_bytes == G
    with pytest.raises(RuntimeError, match="closed"):
        b.commit(0, G)
    assert int(t[:4].sum()) == 0  # the live view reads scratch zeros, not freed memory
    del t
    assert len(drv.reservations) == reservations  # `view` still holds the range
    del view
    import gc

    gc.collect()
    assert len(drv.reservations) == reservations - 1  # gone with the last view
    assert drv.physical_bytes == G


def test_spare_handles_take_cu_mem_create_off_the_commit() -> None:
    device, api = make_device()
    drv = api.driver
    b = CudaVmmBacking(16 * MIB, device)
    device.keep_spares(G, 2)
    device.refill()  # the refill thread's work, run here synchronously
    assert device.spare_bytes == 2 * G
    creates = drv.calls.get("cuMemCreate", 0)
    b.commit(0, G)
    b.commit(G, G)
    assert drv.calls.get("cuMemCreate", 0) == creates  # both from the spares
    assert device.spare_hits == 2
    b.release(0, 2 * G)  # handles go back to the pool (up to its target)
    assert device.spare_bytes == 2 * G
    assert device.trim_spares() == 2 and device.spare_bytes == 0
    assert drv.physical_bytes == G


def test_devices_without_vmm_are_refused() -> None:
    with pytest.raises(BackingUnavailableError, match="does not support virtual memory"):
        make_device(vmm_supported=False)


# -- segmented buffers and the allocator over the fake device ----------------------------------


def test_segmented_buffers_and_allocator_on_the_cuda_backing() -> None:
    device, api = make_device(capacity=64 * MIB)
    drv = api.driver
    row = 4096  # bytes per token per buffer: a 512-token segment is one 2 MiB granule
    geometry = SegmentGeometry(4096, 512, 1)
    backings = [CudaVmmBacking(4096 * row, device) for _ in range(2)]
    buffers = SegmentedBuffers(geometry, backings, [row, row])
    kv = [b.tensor(torch.int32, (4096, row // 4)) for b in backings]
    alloc = SegmentedPageAllocator(
        geometry,
        hold_off_s=0.0,
        on_commit=buffers.commit_segment,
        on_release=buffers.release_segment,
    )
    x = alloc.alloc(1500)  # segments 0-2
    assert x is not None and buffers.committed_segments == 3
    kv[0][x] = 11
    kv[1][x] = 22
    assert drv.physical_bytes == G + 2 * 3 * G
    y = alloc.alloc(600)
    assert y is not None
    alloc.free(y)
    alloc.maybe_shrink()
    assert buffers.committed_segments == 3
    assert bool((kv[0][x] == 11).all()) and bool((kv[1][x] == 22).all())
    # The device fills up: the allocator withholds what cannot be committed.
    drv.capacity = drv.physical_bytes + G  # room for one buffer's granule, not a segment
    assert alloc.alloc(2000) is None
    assert alloc.ceiling == 3 and alloc.withheld_pages() > 0
    assert drv.physical_bytes <= drv.capacity and buffers.committed_segments == 3
    alloc.free(x)
    alloc.maybe_shrink()
    assert buffers.committed_segments == 1 and drv.physical_bytes == G + 2 * G
