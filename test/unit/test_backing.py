"""CpuMmapBacking: reserve without committing, commit/release by range, accounting."""

from __future__ import annotations

import itertools
import mmap
import random

import pytest
import torch
from sglang.srt.mem_cache.segmented.backing import Backing, BackingUnavailableError, RangeSet
from sglang.srt.mem_cache.segmented.cpu_backing import CpuMmapBacking, make_backing

MB = 1 << 20
GB = 1 << 30
PAGE = mmap.PAGESIZE


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def test_reserve_64gb_commits_nothing() -> None:
    before = rss_bytes()
    backing = CpuMmapBacking(64 * GB)
    t = backing.tensor(torch.float16, (64 * GB // 2,))
    assert t.numel() == 32 * GB
    assert backing.reserved_bytes == 64 * GB
    assert backing.committed_bytes == 0
    assert rss_bytes() - before < 8 * MB
    del t
    backing.close()


@pytest.mark.parametrize("populate", [None, False], ids=["populate_write", "touch_fallback"])
def test_commit_and_release_move_rss(populate: bool | None) -> None:
    backing = CpuMmapBacking(64 * GB, populate=populate)
    base = backing.tensor(torch.uint8, (64 * GB,))
    offset = 8 * GB
    before = rss_bytes()
    backing.commit(offset, 64 * MB)
    grown = rss_bytes() - before
    assert 60 * MB <= grown <= 72 * MB, grown / MB
    assert backing.committed_bytes == 64 * MB
    if populate is False:
        assert backing.uses_populate_write is False

    base[offset : offset + 64 * MB].fill_(0xAB)
    assert rss_bytes() - before <= 72 * MB  # writing committed memory faults nothing new

    backing.release(offset, 64 * MB)
    assert rss_bytes() - before < 4 * MB
    assert backing.committed_bytes == 0
    assert int(base[offset : offset + 64 * MB].count_nonzero()) == 0
    del base
    backing.close()


def test_commit_does_not_change_data() -> None:
    # Committing an already-resident range (or touching it) must not disturb its bytes.
    for populate in (None, False):
        backing = CpuMmapBacking(16 * PAGE, populate=populate)
        t = backing.tensor(torch.uint8, (16 * PAGE,))
        backing.commit(0, 4 * PAGE)
        t[: 4 * PAGE] = 7
        backing.release(0, PAGE)
        backing.commit(0, 8 * PAGE)  # partially committed range
        assert int(t[:PAGE].count_nonzero()) == 0
        assert bool((t[PAGE : 4 * PAGE] == 7).all())
        assert int(t[4 * PAGE :].count_nonzero()) == 0
        del t
        backing.close()


def test_release_leaves_other_ranges_intact() -> None:
    backing = CpuMmapBacking(1 * GB, granularity=2 * MB)
    t = backing.tensor(torch.int32, (GB // 4,))
    backing.commit(0, 8 * MB)
    pattern = torch.arange(8 * MB // 4, dtype=torch.int32)
    t[: 8 * MB // 4] = pattern
    backing.release(2 * MB, 2 * MB)
    assert torch.equal(t[: 2 * MB // 4], pattern[: 2 * MB // 4])
    assert int(t[2 * MB // 4 : 4 * MB // 4].count_nonzero()) == 0
    assert torch.equal(t[4 * MB // 4 : 8 * MB // 4], pattern[4 * MB // 4 : 8 * MB // 4])
    assert backing.committed_bytes == 6 * MB
    assert backing.committed_ranges() == [(0, 2 * MB), (4 * MB, 8 * MB)]
    del t
    backing.close()


def test_committed_bytes_accounting_is_idempotent() -> None:
    backing = CpuMmapBacking(64 * PAGE)
    backing.commit(0, 4 * PAGE)
    backing.commit(0, 4 * PAGE)  # already committed: no-op
    backing.commit(2 * PAGE, 4 * PAGE)  # overlaps: only 2 new pages
    assert backing.committed_bytes == 6 * PAGE
    backing.release(10 * PAGE, 4 * PAGE)  # uncommitted: no-op
    assert backing.committed_bytes == 6 * PAGE
    backing.release(PAGE, 2 * PAGE)
    assert backing.committed_bytes == 4 * PAGE
    assert backing.is_committed(0, PAGE) and not backing.is_committed(0, 2 * PAGE)
    backing.commit(0, 0)
    backing.release(0, 0)
    assert backing.committed_bytes == 4 * PAGE
    backing.close()
    assert backing.committed_bytes == 0


def test_reservation_rounds_up_to_granularity() -> None:
    backing = CpuMmapBacking(PAGE + 1, granularity=4 * PAGE)
    assert backing.granularity == 4 * PAGE
    assert backing.reserved_bytes == 4 * PAGE
    backing.close()


@pytest.mark.parametrize(
    ("offset", "nbytes"),
    [(1, PAGE), (0, PAGE + 1), (PAGE // 2, PAGE // 2), (-PAGE, PAGE), (0, -PAGE)],
)
def test_misaligned_ranges_rejected(offset: int, nbytes: int) -> None:
    backing = CpuMmapBacking(16 * PAGE)
    with pytest.raises(ValueError, match="granularity"):
        backing.commit(offset, nbytes)
    with pytest.raises(ValueError, match="granularity"):
        backing.release(offset, nbytes)
    backing.close()


def test_out_of_range_and_bad_granularity_rejected() -> None:
    backing = CpuMmapBacking(16 * PAGE)
    with pytest.raises(ValueError, match="exceeds the reservation"):
        backing.commit(8 * PAGE, 16 * PAGE)
    with pytest.raises(ValueError, match="reserved"):
        backing.tensor(torch.float32, (16 * PAGE,))
    backing.close()
    with pytest.raises(RuntimeError, match="closed"):
        backing.commit(0, PAGE)
    with pytest.raises(ValueError, match="multiple of the OS page size"):
        CpuMmapBacking(16 * PAGE, granularity=PAGE + 512)
    with pytest.raises(ValueError, match="positive"):
        CpuMmapBacking(0)


def test_close_keeps_live_views_valid() -> None:
    backing = CpuMmapBacking(4 * PAGE)
    t = backing.tensor(torch.uint8, (4 * PAGE,))
    backing.commit(0, PAGE)
    t[0] = 5
    backing.close()
    # The mapping survives until the last view dies; the memory was given back (reads zero).
    assert int(t[0]) == 0
    t[1] = 3
    assert int(t[1]) == 3


def test_make_backing() -> None:
    backing = make_backing("cpu", 10 * PAGE, None)
    assert isinstance(backing, CpuMmapBacking)
    assert isinstance(backing, Backing)
    assert backing.granularity == PAGE
    backing.close()
    with pytest.raises(BackingUnavailableError, match="CudaBackingFactory"):
        make_backing("cuda", 10 * PAGE, None)
    with pytest.raises(BackingUnavailableError, match="CudaBackingFactory"):
        make_backing("cuda:1", 10 * PAGE, 2 * MB)
    with pytest.raises(BackingUnavailableError, match="meta"):
        make_backing("meta", 10 * PAGE, None)


def test_range_set_matches_reference() -> None:
    rng = random.Random(1)
    rs = RangeSet()
    ref: set[int] = set()
    for _ in range(5000):
        lo = rng.randrange(0, 200)
        hi = lo + rng.randrange(0, 30)
        span = set(range(lo, hi))
        if rng.random() < 0.55:
            assert rs.add(lo, hi) == len(span - ref)
            ref |= span
        else:
            assert rs.remove(lo, hi) == len(span & ref)
            ref -= span
        assert rs.total == len(ref)
        q_lo = rng.randrange(0, 230)
        q_hi = q_lo + rng.randrange(0, 30)
        assert rs.overlap(q_lo, q_hi) == len(ref & set(range(q_lo, q_hi)))
        ivals = rs.intervals()
        assert all(a < b for a, b in ivals)
        assert all(b1 < a2 for (_, b1), (a2, _) in itertools.pairwise(ivals))
        assert set().union(*(range(a, b) for a, b in ivals)) == ref
