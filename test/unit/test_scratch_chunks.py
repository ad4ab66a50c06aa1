"""Large reservations map their scratch chunk by chunk (issue 31, item 4): one mapping for
`SCRATCH_CHUNK_GRANULES` granules, split into granule mappings by the first commit in the
chunk; what the split unmaps counts as remapped for the reads in flight."""

from __future__ import annotations

import torch
from fake_cuda import MIB, FakeDriver, FakeVmmApi
from sglang.srt.mem_cache.segmented.cuda_backing import CudaVmmBacking, VmmDevice
from sglang.srt.mem_cache.segmented.row_commits import RowCommits
from sglang.srt.mem_cache.segmented.vmm_device import (
    CHUNKED_RESERVATION_MIN_CHUNKS,
    SCRATCH_CHUNK_GRANULES,
)

G = 2 * MIB
CHUNK = SCRATCH_CHUNK_GRANULES * G


def _device(capacity: int = 512 * MIB) -> tuple[VmmDevice, FakeDriver]:
    driver = FakeDriver(capacity=capacity, min_granularity=G)
    return VmmDevice(FakeVmmApi(driver), 0, background_refill=False), driver


def test_a_large_reservation_maps_one_scratch_chunk_per_chunk() -> None:
    device, driver = _device()
    chunks = CHUNKED_RESERVATION_MIN_CHUNKS * 2
    before = driver.calls.get("cuMemMap", 0)
    backing = CudaVmmBacking(chunks * CHUNK + 3 * G, device)  # a tail of three granules
    # One per chunk, one per tail granule, and the chunk handle zeroed once (made on first use).
    assert driver.calls["cuMemMap"] - before == chunks + 3 + 1  # not chunks x 4 + 3
    view = backing.tensor(torch.int32, (backing.reserved_bytes // 4,))
    assert int(view.count_nonzero()) == 0  # every granule reads zeros
    assert device.scratch_bytes == G + CHUNK


def test_a_commit_splits_its_chunk_and_the_rest_still_reads_zeros() -> None:
    device, driver = _device()
    backing = CudaVmmBacking(CHUNKED_RESERVATION_MIN_CHUNKS * CHUNK, device)
    view = backing.tensor(torch.uint8, (backing.reserved_bytes,))
    inside = 5 * CHUNK + G  # the second granule of chunk 5
    assert backing.remap_span(inside, G) == (5 * CHUNK, 6 * CHUNK)  # the whole chunk goes
    backing.commit(inside, G)
    assert backing.remap_span(inside + G, G) == (inside + G, inside + 2 * G)  # split now
    view[inside : inside + G] = 7
    assert int(view[5 * CHUNK : inside].count_nonzero()) == 0
    assert int(view[inside + G : 6 * CHUNK].count_nonzero()) == 0
    assert driver.physical_bytes == device.scratch_bytes + G
    backing.release(inside, G)
    assert int(view[5 * CHUNK : 6 * CHUNK].count_nonzero()) == 0  # scratch again
    assert driver.physical_bytes == device.scratch_bytes
    backing.commit(0, CHUNK)  # a whole chunk: split, then one real mapping over it
    backing.close()
    del view
    assert driver.physical_bytes == device.scratch_bytes  # the range tiled: one unmap freed it


def test_a_split_under_a_neighbours_read_in_flight_waits_for_the_device() -> None:
    """A kernel reads scratch in chunk 2 (a short row read to a longer row's length); a
    commit of another granule of chunk 2 unmaps the whole chunk: it must wait first."""
    device, driver = _device()
    backing = CudaVmmBacking(CHUNKED_RESERVATION_MIN_CHUNKS * CHUNK, device)
    rows = RowCommits(backing, 2 * CHUNKED_RESERVATION_MIN_CHUNKS, CHUNK // 2,
                      commits_unused=True)  # fmt: skip
    rows.note_reads([(4, CHUNK // 2)])  # row 4: the first half of chunk 2, nothing held
    driver.queue_accesses([(backing.address + 2 * CHUNK, backing.address + 2 * CHUNK + G)])
    rows.ensure(5, G)  # row 5: the second half of chunk 2
    assert driver.faults == [] and rows.reach_waits == 1
