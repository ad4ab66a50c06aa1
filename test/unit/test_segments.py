"""SegmentedPageAllocator: growth on demand, the cap, commits ahead and their failures, rank
agreement, staged frees, and a randomized run against a model."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import pytest
import torch
from segment_helpers import PAGE, FakeClock, make_alloc, pages, span
from sglang.srt.mem_cache.segmented.allocator import SegmentedPageAllocator
from sglang.srt.mem_cache.segmented.buffers import SegmentedBuffers
from sglang.srt.mem_cache.segmented.cpu_backing import CpuBackingFactory
from sglang.srt.mem_cache.segmented.geometry import SegmentGeometry, aligned_segment_tokens

# -- allocator, page_size 1 ----------------------------------------------------------------


def test_initial_state_and_lowest_first() -> None:
    a, events, _ = make_alloc()
    assert events == [("commit", 0)]
    assert a.committed_segments == 1
    assert a.free_pages.tolist() == span(1, 64)  # page 0 is padding
    assert a.capacity_pages == 255 and a.available_pages() == 255
    x = a.alloc(3)
    assert x is not None and x.tolist() == [1, 2, 3]
    a.free(pages(2))
    y = a.alloc(2)
    assert y is not None and y.tolist() == [2, 4]
    assert a.available_pages() == 255 - 4
    a.check_invariants()


def test_growth_on_demand() -> None:
    a, events, _ = make_alloc()
    x = a.alloc(63)
    assert x is not None and x.tolist() == span(1, 64)
    assert a.committed_segments == 1 and len(a.free_pages) == 0
    y = a.alloc(70)  # needs segment 1 entirely plus 6 pages of segment 2
    assert y is not None and y.tolist() == span(64, 134)
    assert events == [("commit", 0), ("commit", 1), ("commit", 2)]
    assert a.committed_segments == a.peak_committed_segments == 3
    assert a.commits == 3
    a.check_invariants()
    # ensure_free commits only what is needed.
    assert a.ensure_free(58)
    assert a.committed_segments == 3
    assert a.ensure_free(59)
    assert a.committed_segments == 4
    a.check_invariants()


def test_cap_never_exceeded() -> None:
    a, events, _ = make_alloc()
    assert a.alloc(256) is None
    assert not a.ensure_free(256)
    assert a.committed_segments == 1  # a hopeless request commits nothing
    x = a.alloc(255)
    assert x is not None and x.tolist() == span(1, 256)
    assert a.committed_segments == 4
    assert a.alloc(1) is None
    assert not a.ensure_free(1)
    assert a.available_pages() == 0
    assert len(events) == 4
    a.free(x[10:20])
    z = a.alloc(10)
    assert z is not None and z.tolist() == span(11, 21)
    a.check_invariants()


def test_alloc_zero_and_negative() -> None:
    a, _, _ = make_alloc()
    x = a.alloc(0)
    assert x is not None and x.numel() == 0
    with pytest.raises(ValueError):
        a.alloc(-1)
    a.free(torch.empty(0, dtype=torch.int64))
    a.check_invariants()


def test_debug_mode_catches_bad_frees() -> None:
    a, _, _ = make_alloc()
    x = a.alloc(4)
    assert x is not None
    a.free(x[:2])
    with pytest.raises(ValueError, match="not allocated"):
        a.free(x[:1])
    with pytest.raises(ValueError, match="outside"):
        a.free(pages(100))  # uncommitted segment
    with pytest.raises(ValueError, match="outside"):
        a.free(pages(0))  # padding page
    with pytest.raises(ValueError, match="twice"):
        a.free(pages(3, 3))


def _flaky_commits(
    a: SegmentedPageAllocator, events: list[tuple[str, int]], failing: bool
) -> dict[str, bool]:
    """Make the allocator's commits raise MemoryError while the returned switch is on."""
    fail = {"on": failing}

    def flaky(seg: int) -> None:
        if fail["on"]:
            raise MemoryError("no memory")
        events.append(("commit", seg))

    a.on_commit = flaky
    return fail


def test_commit_failure_withholds_the_rest_and_retry_lifts_it() -> None:
    a, events, clock = make_alloc(retry_s=2.0)
    fail = _flaky_commits(a, events, failing=True)
    assert a.available_pages() == 255
    assert a.alloc(100) is None  # needs segment 1: the commit fails, nothing is handed out
    assert a.committed_segments == 1 and len(a.free_pages) == 63
    assert a.ceiling == 1 and a.commit_failures == 1
    assert a.available_pages() == 63 and a.withheld_pages() == 192
    assert a.last_commit_error == "no memory"
    x = a.alloc(63)  # what is backed is still served
    assert x is not None and a.available_pages() == 0
    a.check_invariants()
    # Before retry_s nothing is tried; after it, a failing retry keeps the ceiling.
    clock.now = 1.0
    assert not a.prepare(10)
    assert a.commit_failures == 1
    clock.now = 2.5
    assert not a.prepare(10)
    assert a.commit_failures == 2 and a.ceiling == 1
    # The memory comes back: the next retry lifts the ceiling and commits ahead.
    fail["on"] = False
    clock.now = 5.0
    assert a.prepare(10)
    assert a.ceiling == a.geometry.num_segments and a.withheld_pages() == 0
    assert a.committed_segments == 2 and a.available_pages() == 255 - 63
    a.free(x)
    a.check_invariants()


def test_pages_promised_below_a_ceiling_are_committed_ahead_not_mid_batch() -> None:
    """After a failed commit, a shrink can release segments below the ceiling; available_pages()
    still promises them, so prepare() must commit them before the scheduler's admission, even
    while the retry is not due: a commit failing mid-batch makes upstream raise "Out of
    memory" on an allocation its admission had counted."""
    a, events, clock = make_alloc(hold_off_s=1.0, retry_s=60.0)
    fail = _flaky_commits(a, events, failing=False)
    assert a.prepare(150) and a.committed_segments == 3
    fail["on"] = True
    assert not a.prepare(250) and a.ceiling == 3  # segment 3 fails: ceiling at 3
    # Segment 2 empties and is released after the hold-off: committed 2, ceiling 3.
    a.maybe_shrink(keep_free_pages=0)
    clock.now += 1.5
    a.maybe_shrink(keep_free_pages=0)
    assert a.committed_segments < a.ceiling
    promised = a.available_pages()
    fail["on"] = False
    clock.now += 0.1  # the retry of the ceiling is not due yet
    assert not a.prepare(promised)  # the ceiling stands, but what it promises is committed
    assert a.committed_segments == a.ceiling
    assert a.num_free_committed == promised
    got = a.alloc(promised)  # the whole promise is served without a commit
    assert got is not None and got.numel() == promised
    a.check_invariants()


def test_prepare_commits_ahead_and_shrink_keeps_the_headroom() -> None:
    a, events, clock = make_alloc(hold_off_s=1.0)
    assert a.prepare(100)  # 63 free in segment 0: segment 1 is committed ahead of need
    assert a.committed_segments == 2 and a.num_free_committed == 127
    assert a.prepare(10_000)  # more than the cap: commits up to the cap, no error
    assert a.committed_segments == 4
    assert a.maybe_shrink(keep_free_pages=100) == 0  # seen empty now: the hold-off starts
    clock.now = 5.0
    # Everything is free and past the hold-off, but 100 pages of headroom stay backed.
    assert a.maybe_shrink(keep_free_pages=100) == 2
    assert a.committed_segments == 2
    assert a.maybe_shrink() == 1
    a.check_invariants()


def test_backed_for_only_where_prepare_has_nothing_to_do() -> None:
    """The scheduler skips `prepare` when `backed_for` says so: it must be True only where
    `prepare` would commit nothing, counting staged frees, and False while a ceiling stands."""
    a, events, _ = make_alloc(lazy_merge=True)
    assert a.backed_for(63) and not a.backed_for(64)  # 63 free pages in segment 0
    x = a.alloc(40)
    assert x is not None and not a.backed_for(24)
    a.free(x)  # staged, not merged: still backed
    assert a.backed_for(63)
    a.prepare(64)
    assert events[-1] == ("commit", 1) and a.backed_for(127)
    a.ceiling = 1  # as after a failed commit elsewhere: prepare has work (retry, withheld)
    assert not a.backed_for(1)


def test_hold_off_inf_never_releases_and_nan_is_refused() -> None:
    a, _, clock = make_alloc(hold_off_s=float("inf"))
    x = a.alloc(200)
    assert x is not None
    a.free(x)
    clock.now = 1e12
    assert a.maybe_shrink() == 0 and a.committed_segments == 4
    with pytest.raises(ValueError, match="hold_off_s"):
        make_alloc(hold_off_s=float("nan"))


def test_staged_frees_are_visible_and_double_frees_caught() -> None:
    a, _, _ = make_alloc(lazy_merge=True)
    x = a.alloc(8)
    assert x is not None
    a.free(x[:4])
    assert sorted(a.all_free_pages().tolist()) == span(1, 5) + span(9, 64)
    assert a._num_staged == 4  # still staged: the census sees them anyway
    with pytest.raises(AssertionError, match="not allocated"):
        a.free(x[:1])  # debug: a double free of a staged page is caught at once
    # Without the debug bitmap a double free still shows in the census, as upstream's does.
    b = SegmentedPageAllocator(SegmentGeometry(256, 64, 1), lazy_merge=True)
    y = b.alloc(8)
    assert y is not None
    b.free(y[:4])
    b.free(y[:4])
    census = b.all_free_pages()
    assert len(census) - len(torch.unique(census)) == 4
    assert b.available_pages() == 251 + 4  # 4 pages counted twice, as upstream counts them
    assert any("free twice" in p for p in b.accounting_problems())


class LockStepRanks:
    """Two ranks in threads; `agree` is a MIN all-reduce over them (a barrier each call)."""

    def __init__(self, n: int = 2) -> None:
        import threading

        self.n = n
        self.barrier = threading.Barrier(n, timeout=10)
        self.values: list[int] = [0] * n
        self.calls: list[int] = [0] * n

    def agree_for(self, rank: int) -> Callable[[int], int]:
        def agree(value: int) -> int:
            self.calls[rank] += 1
            self.values[rank] = value
            self.barrier.wait()
            result = min(self.values)
            self.barrier.wait()
            return result

        return agree

    def run(self, body: Callable[[int], object]) -> list[object]:
        import threading

        results: list[object] = [None] * self.n
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                results[rank] = body(rank)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "ranks hung"
        if errors:
            raise errors[0]
        return results


def test_ranks_agree_on_a_commit_that_fails_on_one_of_them() -> None:
    ranks = LockStepRanks()
    clock = FakeClock()
    fail_rank1 = {"on": True}

    def body(rank: int) -> dict[str, object]:
        def on_commit(seg: int) -> None:
            if rank == 1 and seg >= 2 and fail_rank1["on"]:
                raise MemoryError("taken by another process")

        a = SegmentedPageAllocator(
            SegmentGeometry(256, 64, 1),
            clock=clock,
            hold_off_s=0.0,
            retry_s=0.0,
            on_commit=on_commit,
            agree=ranks.agree_for(rank),
            debug=True,
        )
        x = a.alloc(100)  # segments 0-1: fine everywhere
        y = a.alloc(50)  # segment 2 fails on rank 1: refused on both ranks
        seen = {"y": y is None, "avail": a.available_pages(), "ceiling": a.ceiling}
        seen["committed_after_failure"] = a.committed_segments
        assert x is not None
        a.free(x)
        a.maybe_shrink()  # every rank shrinks to the same count
        seen["committed_after_shrink"] = a.committed_segments
        a.check_invariants()
        return seen

    r0, r1 = ranks.run(body)
    assert r0["y"] and r1["y"]  # the same decision on both ranks
    assert r0["avail"] == r1["avail"] == 127 - 100
    assert r0["ceiling"] == r1["ceiling"] == 2
    # Rank 0 committed segment 2 (withheld); rank 1 could not.
    assert (r0["committed_after_failure"], r1["committed_after_failure"]) == (3, 2)
    assert r0["committed_after_shrink"] == r1["committed_after_shrink"] == 1
    assert ranks.calls[0] == ranks.calls[1]


def test_clear() -> None:
    a, _, clock = make_alloc(hold_off_s=1.0)
    x = a.alloc(100)
    assert x is not None
    clock.now = 3.0
    a.clear()
    assert a.committed_segments == 2
    assert a.free_pages.tolist() == span(1, 128)
    assert a.maybe_shrink(now=3.0) == 0
    assert a.maybe_shrink(now=3.5) == 0
    assert a.maybe_shrink(now=4.0) == 1
    a.check_invariants()


def test_lazy_merge_stages_frees() -> None:
    a, _, _ = make_alloc(lazy_merge=True)
    x = a.alloc(10)
    assert x is not None
    a.free(x[:5])
    assert a.free_pages.tolist() == span(11, 64)  # staged, not merged yet
    assert a.available_pages() == 255 - 5
    y = a.alloc(3)
    assert y is not None and y.tolist() == [11, 12, 13]
    assert a.ensure_free(55)  # 50 merged + 5 staged: merge makes free_pages[:55] valid
    assert a.free_pages[:5].tolist() == span(1, 6)
    assert a.committed_segments == 1
    a.check_invariants()


# -- randomized ----------------------------------------------------------------------------


def _rows(slot_pages: torch.Tensor, page_size: int) -> torch.Tensor:
    return (slot_pages[:, None] * page_size + torch.arange(page_size)).reshape(-1)


@pytest.mark.parametrize(
    ("page_size", "segment_tokens", "lazy_merge", "seed", "commit_failure_rate"),
    [(1, 64, False, 0, 0.0), (16, 256, True, 1, 0.0), (4, 256, True, 2, 0.2)],
    ids=["ps1", "ps16_lazy", "ps4_lazy_failing_commits"],
)
def test_randomized_alloc_free_grow_shrink(
    page_size: int, segment_tokens: int, lazy_merge: bool, seed: int, commit_failure_rate: float
) -> None:
    """4 segments, 64-byte K and V rows, OS-page granularity; 30k mixed operations. With
    failing commits: a failure hands out nothing and leaks nothing, and the pool recovers."""
    n_ops = 30_000
    start = time.perf_counter()
    rng = random.Random(seed)
    ps = page_size
    row_bytes = [64, 64]  # a K and a V buffer
    assert aligned_segment_tokens(segment_tokens, ps, row_bytes, PAGE) == segment_tokens
    geometry = SegmentGeometry(4 * segment_tokens, segment_tokens, ps)
    buffers = SegmentedBuffers.create(geometry, row_bytes, CpuBackingFactory())
    kv = [b.tensor(torch.int32, (geometry.cap_tokens, 16)) for b in buffers.backings]
    clock = FakeClock()
    commit_failures = 0

    def commit(seg: int) -> None:
        nonlocal commit_failures
        if seg > 0 and rng.random() < commit_failure_rate:
            commit_failures += 1
            raise MemoryError("injected")
        buffers.commit_segment(seg)

    alloc = SegmentedPageAllocator(
        geometry,
        first_page=1,
        min_committed_segments=1,
        hold_off_s=0.5,
        retry_s=0.05,
        clock=clock,
        on_commit=commit,
        on_release=buffers.release_segment,
        lazy_merge=lazy_merge,
    )
    cap_pages = alloc.capacity_pages
    live: list[torch.Tensor] = []
    owned = torch.zeros(geometry.cap_pages, dtype=torch.bool)
    expected = torch.zeros(geometry.cap_pages, dtype=torch.int32)
    tag = 0
    target = cap_pages // 2
    next_swing = 0
    seg_bytes = sum(geometry.segment_tokens * rb for rb in row_bytes)

    def write(p: torch.Tensor, value: torch.Tensor) -> None:
        rows = _rows(p, ps)
        vals = value.repeat_interleave(ps)[:, None]
        kv[0][rows] = vals
        kv[1][rows] = ~vals

    def verify(p: torch.Tensor) -> None:
        if p.numel() == 0:
            return
        rows = _rows(p, ps)
        vals = expected[p].repeat_interleave(ps)[:, None]
        assert bool((kv[0][rows] == vals).all()), "live data lost"
        assert bool((kv[1][rows] == ~vals).all()), "live data lost"

    def check_all() -> None:
        alloc.check_invariants()
        assert int(owned.sum()) == cap_pages - alloc.available_pages() - alloc.withheld_pages()
        k = alloc.committed_segments
        assert buffers.committed_segments == k
        assert buffers.committed_bytes == k * seg_bytes
        verify(torch.nonzero(owned).reshape(-1))
        hi_row = min(k * geometry.segment_tokens, geometry.cap_tokens)
        assert int(kv[0][hi_row:].count_nonzero()) == 0, "released memory not zero"

    grows = shrinks = failed = 0
    for op in range(n_ops):
        clock.now += 0.01
        if op == next_swing:
            # Swing the load so segments fill up and drain again.
            target = rng.choice([0, 2, cap_pages // 4, cap_pages // 2, cap_pages])
            next_swing += rng.randint(100, 2000)
        r = rng.random()
        used = cap_pages - alloc.available_pages() - alloc.withheld_pages()
        if r < 0.02:
            before = alloc.committed_segments
            alloc.prepare(rng.randint(0, cap_pages // 3))
            assert alloc.committed_segments >= before
        elif r < 0.05:
            committed = alloc.committed_segments
            released = alloc.maybe_shrink()
            assert alloc.committed_segments == committed - released
            assert alloc.committed_segments >= 1
            shrinks += released
        elif r < 0.08:
            n = rng.randint(0, cap_pages + 4)
            possible = n <= alloc.available_pages()
            before = alloc.committed_segments
            failures_before = alloc.commit_failures
            ok = alloc.ensure_free(n)
            if alloc.commit_failures > failures_before:
                assert not ok and alloc.ceiling == alloc.committed_segments
                continue
            assert ok == possible
            if possible:
                assert alloc.num_free_committed >= n and len(alloc.free_pages) >= n
            else:
                assert alloc.committed_segments == before
            grows += alloc.committed_segments - before
        elif (used < target and r < 0.6) or not live:
            n = rng.choice([1, 1, 1, 2, 3, rng.randint(1, max(1, cap_pages // 6))])
            if rng.random() < 0.01:
                n = rng.randint(cap_pages // 2, cap_pages + 2)
            possible = n <= alloc.available_pages()
            before = alloc.committed_segments
            failures_before = alloc.commit_failures
            got = alloc.alloc(n)
            if alloc.commit_failures > failures_before:
                # Refused like a full pool; the segments that did commit stay usable.
                assert got is None and alloc.ceiling == alloc.committed_segments
                assert alloc.available_pages() == alloc.num_free_committed
                failed += 1
                continue
            if not possible:
                assert got is None
                assert alloc.committed_segments == before
                failed += 1
                continue
            assert got is not None and got.numel() == n
            assert not bool(owned[got].any()), "page handed out twice"
            assert alloc.committed_segments <= geometry.num_segments
            grows += alloc.committed_segments - before
            owned[got] = True
            tag += 1
            values = torch.arange(tag * 1024, tag * 1024 + n, dtype=torch.int32)
            expected[got] = values
            write(got, values)
            live.append(got.clone())
        else:
            i = rng.randrange(len(live))
            victim = live[i]
            if victim.numel() > 1 and rng.random() < 0.3:
                cut = rng.randint(1, victim.numel() - 1)
                freed, live[i] = victim[:cut], victim[cut:]
            else:
                freed = victim
                live[i] = live[-1]
                live.pop()
            verify(freed)
            owned[freed] = False
            alloc.free(freed)
        if op % 2000 == 0:
            check_all()

    check_all()
    for p in live:
        verify(p)
        alloc.free(p)
    owned.zero_()
    clock.now += 10.0
    commit_failure_rate = 0.0
    assert alloc.prepare(0)  # a pending ceiling is lifted once commits work again
    assert alloc.available_pages() == cap_pages
    alloc.maybe_shrink()  # sees every segment empty ...
    clock.now += 1.0
    alloc.maybe_shrink()  # ... and releases them once the hold-off has passed
    assert alloc.committed_segments == 1
    assert buffers.committed_segments == 1
    assert buffers.committed_bytes == seg_bytes
    check_all()
    assert grows > 30 and shrinks > 30 and failed > 10, (grows, shrinks, failed)
    assert alloc.commits == alloc.releases + 1
    assert alloc.commit_failures == commit_failures
    if commit_failure_rate:
        assert commit_failures > 20
    elapsed = time.perf_counter() - start
    print(
        f"\n{n_ops} ops ps={ps} lazy={lazy_merge}: {elapsed:.1f}s, commits={alloc.commits} "
        f"releases={alloc.releases} failed_allocs={failed} failed_commits={commit_failures}"
    )
    kv.clear()
    buffers.close()
