"""Upstream's allocator contracts, asserted of upstream's allocators and the segmented ones alike.

The contracts are those upstream's own allocator unit tests check (sgl-project/sglang,
test/registered/unit/mem_cache/test_allocator_cpu.py and test_allocator_gpu.py, newer than
0.5.23), restricted to the API 0.5.23 has: no backup_state/restore_state there. Two of their
assertions look inside the free lists (`len(free_pages)`, `len(release_pages)`) and do not
apply: segmented keeps uncommitted segments out of `free_pages` by design (only
`available_size()` counts them, and no upstream code outside the allocators reads the lists).
"""

from __future__ import annotations

import mmap
import types
from collections.abc import Callable

import pytest
import torch
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.segmented import kv_allocators as allocators
from sglang.srt.mem_cache.segmented.buffers import SegmentedBuffers
from sglang.srt.mem_cache.segmented.cpu_backing import CpuBackingFactory
from sglang.srt.mem_cache.segmented.geometry import SegmentGeometry
from sglang.srt.mem_cache.segmented.kv_allocators import (
    SegmentedPagedTokenToKVPoolAllocator,
    SegmentedTokenToKVPoolAllocator,
)
from sglang.srt.mem_cache.segmented.kv_pools import SegmentedMHATokenToKVPool
from sglang.srt.mem_cache.segmented.runtime import RUNTIME

IMPLS = ["upstream", "segmented"]


def _buffers(size: int, page_size: int, segment_tokens: int) -> types.SimpleNamespace:
    """A KV pool stand-in over real segmented buffers: several segments of one OS page."""
    geometry = SegmentGeometry(size + page_size, segment_tokens, page_size)
    row = mmap.PAGESIZE // segment_tokens
    return types.SimpleNamespace(
        segmented_buffers=SegmentedBuffers.create(geometry, [row, row], CpuBackingFactory())
    )


def token_allocator(impl: str, size: int = 16, need_sort: bool = False):
    if impl == "upstream":
        return TokenToKVPoolAllocator(size, torch.int64, "cpu", None, need_sort)
    kv = _buffers(size, 1, 4)
    return SegmentedTokenToKVPoolAllocator(size, torch.int64, "cpu", kv, need_sort)


def paged_allocator(impl: str, size: int = 64, page_size: int = 4, need_sort: bool = False):
    if impl == "upstream":
        return PagedTokenToKVPoolAllocator(size, page_size, torch.int64, "cpu", None, need_sort)
    kv = _buffers(size, page_size, 2 * page_size)
    return SegmentedPagedTokenToKVPoolAllocator(size, page_size, torch.int64, "cpu", kv, need_sort)


@pytest.fixture(autouse=True)
def _no_hold_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(RUNTIME.settings, "hold_off_s", 0.0)


# -- page size 1 ---------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("need_sort", [False, True])
def test_token_alloc_free_and_capacity(impl: str, need_sort: bool) -> None:
    a = token_allocator(impl, need_sort=need_sort)
    x = a.alloc(4)
    assert x is not None and len(x) == 4 and a.available_size() == 12
    y = a.alloc(8)
    assert y is not None and len(torch.unique(y)) == 8
    assert not set(x.tolist()) & set(y.tolist())
    assert a.alloc(5) is None  # 4 left
    z = a.alloc(0)
    assert z is not None and len(z) == 0 and a.available_size() == 4
    a.free(x)
    a.free(torch.empty(0, dtype=torch.int64))
    assert a.available_size() == 8
    again = a.alloc(8)  # freed slots are reusable (after the merge need_sort implies)
    assert again is not None and a.available_size() == 0
    a.free(again)
    a.free(y)
    assert a.available_size() == 16
    every = a.alloc(16)
    assert every is not None and 0 not in every.tolist()  # slot 0 is padding
    assert sorted(every.tolist()) == list(range(1, 17))


@pytest.mark.parametrize("impl", IMPLS)
def test_token_free_group_holds_frees_until_its_end(impl: str) -> None:
    a = token_allocator(impl)
    x, y = a.alloc(4), a.alloc(4)
    assert a.available_size() == 8
    a.free_group_begin()
    a.free(x)
    a.free(y)
    assert a.available_size() == 8
    a.free_group_end()
    assert a.available_size() == 16
    a.free_group_begin()
    a.free_group_end()  # an empty group is a no-op
    assert a.available_size() == 16


@pytest.mark.parametrize("impl", IMPLS)
def test_token_clear_restores_full_capacity(impl: str) -> None:
    a = token_allocator(impl)
    assert a.alloc(12) is not None
    a.clear()
    assert a.available_size() == 16
    assert a.alloc(16) is not None


# -- paged ---------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("need_sort", [False, True])
def test_paged_alloc_free_alignment_and_capacity(impl: str, need_sort: bool) -> None:
    a = paged_allocator(impl, need_sort=need_sort)
    x = a.alloc(8)
    assert x is not None and len(x) == 8 and a.available_size() == 56
    assert int(x[0]) % 4 == 0 and int(x[4]) % 4 == 0
    assert x.tolist() == list(range(int(x[0]), int(x[0]) + 4)) + list(
        range(int(x[4]), int(x[4]) + 4)
    )
    y = a.alloc(16)
    assert y is not None and len(torch.unique(y)) == 16
    a.free(x)
    a.free(y)
    assert a.available_size() == 64
    every = a.alloc(64)
    assert every is not None and 0 not in every.tolist()
    assert a.alloc(4) is None
    small = paged_allocator(impl, size=16, need_sort=need_sort)
    assert small.alloc(20) is None


@pytest.mark.parametrize("impl", IMPLS)
def test_paged_free_group_and_clear(impl: str) -> None:
    a = paged_allocator(impl, size=32)
    x, y = a.alloc(4), a.alloc(4)
    a.free_group_begin()
    a.free(x)
    a.free(y)
    assert a.available_size() == 24
    a.free_group_end()
    assert a.available_size() == 32
    assert a.alloc(32) is not None
    a.clear()
    assert a.available_size() == 32


@pytest.mark.parametrize("impl", IMPLS)
def test_paged_unaligned_size_floors_to_pages(impl: str) -> None:
    a = paged_allocator(impl)
    out = a.alloc(6)  # not page-aligned: upstream hands out whole pages (6 // 4 = 1)
    assert out is not None and len(out) == 4


def _extend_decode_trace(a) -> list[list[int]]:
    """The kernels' own path (naive on the CPU): two extends and decodes across pages."""
    outs = []
    pre = torch.tensor([0, 0])
    seq = torch.tensor([6, 9])
    last = torch.tensor([-1, -1])
    out = a.alloc_extend(pre, pre.clone(), seq, seq.clone(), last, 15)
    outs.append(out.tolist())
    # A request with a cached prefix of 2 tokens ending at slot out[1].
    pre2 = torch.tensor([2])
    seq2 = torch.tensor([11])
    last2 = torch.tensor([int(out[1])])
    out2 = a.alloc_extend(pre2, pre2.clone(), seq2, seq2.clone(), last2, 9)
    outs.append(out2.tolist())
    for step in range(6):
        seq3 = torch.tensor([7 + step, 10 + step, 12 + step])
        last3 = torch.tensor(
            [outs[0][5] if step == 0 else outs[-1][0], outs[0][-1] if step == 0 else outs[-1][1]]
            + [out2[-1].item() if step == 0 else outs[-1][2]]
        )
        out3 = a.alloc_decode(seq3, seq3.clone(), last3)
        outs.append(out3.tolist())
    outs.append([a.available_size()])
    return outs


def test_paged_extend_and_decode_match_upstream() -> None:
    """The same alloc_extend / alloc_decode calls on fresh pools give the same slots."""
    expected = _extend_decode_trace(paged_allocator("upstream", size=256))
    got = _extend_decode_trace(paged_allocator("segmented", size=256))
    assert got == expected
    assert all(len(set(o)) == len(o) for o in got[:-1])


def test_paged_fast_path_runs_upstream_kernels_once_on_the_core_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Segments committed ahead (as the scheduler's step does): extend and decode run
    upstream's kernels straight on the core's free list, without counting the new pages a
    second time, give upstream's slots, and the core adopts what the kernels left."""
    a = paged_allocator("segmented", size=256)
    a.scheduler_step(256)  # commits every segment ahead of the iteration
    counted: list[int] = []
    real = allocators.get_num_new_pages
    monkeypatch.setattr(
        allocators, "get_num_new_pages", lambda **kw: counted.append(1) or real(**kw)
    )
    got = _extend_decode_trace(a)
    assert counted == []  # the slow path (an exact count first) never ran
    assert got == _extend_decode_trace(paged_allocator("upstream", size=256))
    assert a.free_pages is a._segments.free_pages
    assert a._segments.accounting_problems() == []
    assert a._segments.used_count() == len({s // 4 for o in got[:-1] for s in o})


def test_extend_refused_like_upstream_when_the_pool_is_full() -> None:
    for impl in IMPLS:
        a = paged_allocator(impl, size=16)
        pre = torch.tensor([0])
        seq = torch.tensor([17])
        last = torch.tensor([-1])
        assert a.alloc_extend(pre, pre.clone(), seq, seq.clone(), last, 17) is None, impl
        assert a.available_size() == 16, impl


# -- debug mode and the double-free census --------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_debug_mode_rejects_unaligned_alloc_and_double_free(
    impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SGLANG_DEBUG_MEMORY_POOL", "1")
    a = paged_allocator(impl)
    with pytest.raises(AssertionError):
        a.alloc(3)
    out = a.alloc(4)
    assert out is not None
    a.free(out)
    with pytest.raises(AssertionError):
        a.free(out)


def test_debug_mode_catches_token_double_free_in_segmented(monkeypatch: pytest.MonkeyPatch):
    # Upstream's token allocator has no debug checks; the segmented one checks every free.
    monkeypatch.setenv("SGLANG_DEBUG_MEMORY_POOL", "1")
    a = token_allocator("segmented")
    out = a.alloc(4)
    assert out is not None
    a.free(out[:2])
    with pytest.raises(AssertionError, match="not allocated"):
        a.free(out[:1])


Factory = Callable[[str], object]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("factory", [token_allocator, paged_allocator], ids=["token", "paged"])
def test_census_sees_a_page_freed_twice(impl: str, factory: Factory) -> None:
    """What SGLANG_CHECK_KV_PAGE_INVARIANTS reads: a double free shows as a duplicate page in
    get_all_free_pages(), and the idle leak identity sees available_size() inflated."""
    a = factory(impl)
    total = a.available_size()
    ps = a.page_size
    out = a.alloc(2 * ps)
    a.free(out)
    a.free(out)  # not caught outside debug mode, by either implementation
    census = a.get_all_free_pages()
    assert len(census) - len(torch.unique(census)) == 2
    assert a.available_size() == total + 2 * ps


# -- pools of any size ----------------------------------------------------------------------


@pytest.mark.parametrize(("size", "page_size"), [(8, 1), (16, 4), (1, 1)])
def test_tiny_pools_build_and_serve(size: int, page_size: int) -> None:
    """Upstream builds pools of any size; one segment smaller than an OS page is fine."""
    pool = SegmentedMHATokenToKVPool(size, page_size, torch.float16, 2, 16, 2, "cpu", False)
    assert pool.k_buffer[0].shape == (size + page_size, 2, 16)
    if page_size == 1:
        a = SegmentedTokenToKVPoolAllocator(size, torch.float16, "cpu", pool, False)
    else:
        a = SegmentedPagedTokenToKVPoolAllocator(size, page_size, torch.float16, "cpu", pool, False)
    out = a.alloc(size)
    assert out is not None and len(out) == size and a.available_size() == 0
    pool.k_buffer[1][out] = 1.0
    assert bool((pool.k_buffer[1][out] == 1.0).all())
    a.free(out)
    assert a.available_size() == size
