"""The GPU paths of req_to_token and the RoPE cache, driven through the fake CUDA driver.

On a GPU nothing is committed by a first write, so rows are committed before they are
written, and the RoPE cache is one fixed-address tensor committed as positions are reached.
Here the "device" is host memory behind the fake driver's rules (`test/support/fake_cuda.py`): an
address with no mapping is a fault, an uncommitted one reads the scratch page's zeros.
"""

from __future__ import annotations

import types

import pytest
import torch
from fake_cuda import MIB, FakeDriver, FakeVmmApi
from sglang.srt.mem_cache.segmented import kv_allocators, kv_pools, lazy_req_to_token
from sglang.srt.mem_cache.segmented.cuda_backing import (
    CudaBackingFactory,
    CudaVmmBacking,
    VmmDevice,
)
from sglang.srt.mem_cache.segmented.row_commits import RowCommits
from sglang.srt.mem_cache.segmented.runtime import RUNTIME

G = 64 * 1024  # small granules keep the fake's memfds small


def fake_factory(capacity: int = 64 * MIB) -> tuple[CudaBackingFactory, FakeDriver]:
    driver = FakeDriver(capacity=capacity, min_granularity=G, recommended_granularity=G)
    device = VmmDevice(FakeVmmApi(driver), 0, background_refill=False)
    return CudaBackingFactory(device), driver


def test_row_commits_share_granules_and_release_at_flush() -> None:
    factory, driver = fake_factory()
    row_bytes = 40_000  # not a granule multiple: neighbouring rows share granules
    backing = factory(8 * row_bytes)
    rows = RowCommits(backing, 8, row_bytes)
    rows.ensure(1, 4)  # row 1's first granule (shared with row 0's tail)
    rows.ensure(0, row_bytes)  # all of row 0: granule 0 only
    assert rows.committed_granules == 1
    rows.ensure(1, row_bytes)  # row 1 reaches into granule 1
    assert rows.committed_granules == 2
    assert rows.covered_items(1, 4) == row_bytes // 4
    rows.drop(0)
    assert rows.flush() == 0  # granule 0 is still row 1's
    rows.drop(1)
    rows.ensure(1, 4)  # re-used before the sync point: nothing is remapped
    assert rows.commits == 2
    assert rows.flush() == 1  # granule 1 went; granule 0 is row 1's again
    assert rows.committed_granules == 1 and backing.committed_bytes == G
    rows.drop(1)
    assert rows.flush() == 1 and backing.committed_bytes == 0
    assert driver.physical_bytes == G  # only the scratch granule


class _Req:
    def __init__(self, n_input: int, extend_end: int | None = None) -> None:
        self.origin_input_ids = [0] * n_input
        self.output_ids: list[int] = []
        self.extend_end = extend_end if extend_end is not None else n_input
        self.kv = types.SimpleNamespace(
            holds_kv=False, req_pool_idx=None, kv_allocated_len=0, kv_committed_len=0
        )


@pytest.fixture
def fake_cuda_settings(monkeypatch: pytest.MonkeyPatch):
    factory, driver = fake_factory()
    monkeypatch.setattr(RUNTIME, "backings", factory)
    return factory, driver


def test_req_to_token_rows_are_committed_before_they_are_written(fake_cuda_settings) -> None:
    factory, driver = fake_cuda_settings
    context = 100_000  # 400 KB rows: several granules each
    pool = lazy_req_to_token.SegmentedReqToTokenPool(8, context, "cpu", False)
    assert pool.commits_rows
    assert pool.committed_bytes() == G  # only row 0 (cuda-graph padding)
    assert int(pool.req_to_token[0, :16].count_nonzero()) == 0
    reqs = [_Req(30_000), _Req(5)]
    rows = pool.alloc(reqs)
    assert rows is not None
    # What upstream writes right after alloc: the extend's slots, in each row's prefix.
    for row, req in zip(rows, reqs, strict=True):
        pool.write((row, slice(0, req.extend_end)), torch.arange(1, req.extend_end + 1))
        assert int(pool.req_to_token[row, req.extend_end - 1]) == req.extend_end
    committed = pool.committed_bytes()
    assert committed >= 30_000 * 4
    # Decode grows the long row past its granules: committed ahead of the write.
    pool.ensure_rows([(rows[0], 70_000)])
    pool.write((rows[0], slice(69_990, 70_000)), torch.full((10,), 7))
    assert int(pool.req_to_token[rows[0], 69_999]) == 7
    assert pool.committed_bytes() > committed
    # Freed rows retire behind a fence at the next sync point and go at a later one once the
    # kernels queued before it have finished, with no device synchronize on the way.
    api = factory.device.api
    syncs = api.syncs
    pool.free_rows(rows)
    assert pool.committed_bytes() > G
    pool.sync_point()
    assert pool.committed_bytes() > G  # the fence has not passed: a kernel may still read
    pool.sync_point()
    assert pool.committed_bytes() > G
    api.work_done()
    pool.sync_point()
    assert pool.committed_bytes() == G
    assert api.syncs == syncs
    assert int(pool.req_to_token[rows[0], 69_999]) == 0  # the scratch page again
    # Scratch, row 0's granule, and the spare handles kept for the next rows.
    assert factory.device.spare_bytes == 2 * G
    assert driver.physical_bytes == 2 * G + factory.device.spare_bytes


def test_fixed_address_rope_matches_upstreams_growth(fake_cuda_settings) -> None:
    from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding
    from sglang.srt.mem_cache.segmented.rope_cache import FixedAddressRope

    factory, driver = fake_cuda_settings

    def rope() -> RotaryEmbedding:
        return RotaryEmbedding(32, 32, 64, 10_000, True, torch.float32)

    fixed_module, reference = rope(), rope()
    fixed = FixedAddressRope(fixed_module, 100_000, torch.float32, factory)
    address = fixed_module.cos_sin_cache.data_ptr()
    assert fixed_module.cos_sin_cache.shape == (100_000, 32)
    assert fixed.committed_bytes == G  # 64 rows x 128 B: the first granule
    fixed.grow(5_000)
    reference._ensure_cos_sin_cache_length(fixed.rows - 1)  # upstream's (aligned) growth
    assert fixed.rows >= 5_000 and reference.cos_sin_cache.shape[0] >= fixed.rows
    assert torch.equal(
        fixed_module.cos_sin_cache[: fixed.rows], reference.cos_sin_cache[: fixed.rows]
    )
    assert fixed_module.cos_sin_cache.data_ptr() == address  # graphs keep their address
    assert int(fixed_module.cos_sin_cache[fixed.rows + 600 :].count_nonzero()) == 0
    assert fixed.committed_bytes < 100_000 * 128 // 4
    # Upstream's own growth call finds the cache long enough and leaves it in place.
    fixed_module._ensure_cos_sin_cache_length(99_000)
    assert fixed_module.cos_sin_cache.data_ptr() == address


def test_segmented_kv_pool_and_allocator_on_the_vmm_backing(fake_cuda_settings) -> None:
    """Upstream's MHA pool class (segmented) with its buffers on the CUDA backing: data lands
    at the slots the allocator hands out, across segments, and released memory reads zero."""
    factory, driver = fake_cuda_settings
    pool = kv_pools.SegmentedMHATokenToKVPool(8192, 1, torch.float32, 2, 16, 2, "cpu", False)
    assert all(isinstance(b, CudaVmmBacking) for b in pool.segmented_buffers.backings)
    alloc = kv_allocators.SegmentedTokenToKVPoolAllocator(8192, torch.float32, "cpu", pool, False)
    alloc.scheduler_step(3000)
    slots = alloc.alloc(3000)
    assert slots is not None
    pool.k_buffer[1][slots] = 2.5
    assert bool((pool.k_buffer[1][slots] == 2.5).all())
    assert pool.segmented_buffers.committed_segments > 1
    alloc.free(slots)
    seg = alloc._segments
    seg.hold_off_s = 0.0
    for _ in range(2):
        seg.maybe_shrink()
    assert pool.segmented_buffers.committed_segments == 1
    first = pool.segmented_buffers.geometry.segment_tokens
    kept, released = slots[slots < first], slots[slots >= first]
    assert len(released) > 0
    assert bool((pool.k_buffer[1][kept] == 2.5).all())  # segment 0 stays committed
    assert int(pool.k_buffer[1][released].count_nonzero()) == 0  # the scratch page's zeros
