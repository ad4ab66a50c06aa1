"""SegmentedPageAllocator giving memory back: only trailing segments, only after the hold-off,
never a segment in use, a failed release undone."""

from __future__ import annotations

import random

import pytest
import torch
from segment_helpers import make_alloc, span

# -- shrinking -----------------------------------------------------------------------------


def test_shrink_after_hold_off_only() -> None:
    a, events, clock = make_alloc(cap=1024, seg=256, ps=16, hold_off_s=2.0)
    assert a.capacity_pages == 63
    x = a.alloc(20)  # segment 0 has 15 usable pages, so segment 1 is committed
    assert x is not None and x.tolist() == span(1, 21)
    assert a.committed_segments == 2
    clock.now = 10.0
    a.free(x)
    # Hold-offs run from the first shrink check that sees a segment entirely free.
    assert a.maybe_shrink(now=10.0) == 0
    assert a.maybe_shrink(now=11.9) == 0
    assert a.maybe_shrink(now=12.0) == 1
    assert a.committed_segments == 1 and a.releases == 1
    assert events[-1] == ("release", 1)
    assert a.free_pages.tolist() == span(1, 16)  # segment 1's pages left the free list
    assert a.maybe_shrink(now=1e9) == 0  # segment 0 is never released
    a.check_invariants()
    # Growth after a release re-commits the same segment.
    y = a.alloc(16)
    assert y is not None and y.tolist() == span(1, 17)
    assert events[-1] == ("commit", 1) and a.commits == 3
    a.check_invariants()


def test_shrink_only_trailing_and_not_while_in_use() -> None:
    a, events, clock = make_alloc(cap=1024, seg=256, ps=16, hold_off_s=1.0)
    x = a.alloc(47)  # fills segments 0, 1 and 2
    assert x is not None and a.committed_segments == 3
    seg1 = torch.tensor(span(16, 32))
    seg2 = torch.tensor(span(32, 48))
    a.free(seg1)
    assert a.maybe_shrink(now=0.0) == 0  # segment 1 seen empty at t=0
    clock.now = 5.0
    assert a.maybe_shrink() == 0  # segment 1 is empty but segment 2 above it is not
    a.free(seg2[1:])
    assert a.maybe_shrink(now=5.0) == 0  # one page of segment 2 still in use
    a.free(seg2[:1])
    assert a.maybe_shrink(now=5.0) == 0  # segment 2 seen empty at t=5
    assert a.maybe_shrink(now=5.5) == 0
    assert a.maybe_shrink(now=6.0) == 2  # segment 2, then segment 1 (empty since t=0)
    assert [e for e in events if e[0] == "release"] == [("release", 2), ("release", 1)]
    assert a.committed_segments == 1 and a.peak_committed_segments == 3
    a.check_invariants()


def test_delayed_census_never_releases_a_segment_in_use() -> None:
    """The periodic check while serving (fresh=False; on a GPU the census would wait for the
    running batch) reads the census launched at the previous check: nothing is released on
    the first, a segment seen free then is released on the next, and one taken again in
    between is checked exactly and kept."""
    a, events, clock = make_alloc(cap=1024, seg=256, ps=16, hold_off_s=0.0)
    a.delayed_census = True
    x = a.alloc(47)  # segments 0, 1 and 2
    assert x is not None and a.committed_segments == 3
    a.free(x[31:])  # segment 2 entirely free
    assert a.maybe_shrink(fresh=False) == 0  # no census landed yet
    taken = a.alloc(1)  # the lowest free page: segment 2 is in use again
    assert taken is not None and taken.tolist() == [32]
    a.free(x[:1])  # ... and a page below it is free, so the count alone cannot tell
    assert a.maybe_shrink(fresh=False) == 0  # the census said free; the exact check says not
    assert a.committed_segments == 3 and not any(e[0] == "release" for e in events)
    x = x[1:]
    a.free(taken)
    assert a.maybe_shrink(fresh=False) == 0  # the last census saw page 32 taken
    assert a.maybe_shrink(fresh=False) == 1  # ... this one saw segment 2 free
    assert a.committed_segments == 2
    # A census of another committed count is not used; a fresh check (idle) is exact at once.
    a.free(x[14:30])
    assert a.maybe_shrink(fresh=False) == 0
    assert a.maybe_shrink() == 1 and a.committed_segments == 1
    a.check_invariants()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_release_only_after_seen_free_for_the_hold_off(seed: int) -> None:
    """Whatever the checks skip (a top segment the used count proves busy, segments below the
    first one in use), a segment is released only when it was seen entirely free at every
    check of a whole hold-off, and never while a page of it is handed out."""
    rng = random.Random(seed)
    hold_off = 1.0
    a, events, clock = make_alloc(cap=512, seg=32, ps=1, hold_off_s=hold_off, lazy_merge=True)
    held: list[torch.Tensor] = []
    checks: list[tuple[float, set[int]]] = []  # (time, segments entirely free then)
    released = 0
    for _ in range(600):
        clock.now += rng.choice([0.05, 0.1, 0.3])
        if held and rng.random() < 0.45:
            a.free(held.pop(rng.randrange(len(held))))
        elif rng.random() < 0.9:
            got = a.alloc(rng.randint(1, 40 if rng.random() < 0.8 else 160))
            if got is not None:
                held.append(got)
        in_use = {int(p) // 32 for chunk in held for p in chunk}
        free_now = set(range(a.committed_segments)) - in_use
        checks.append((clock.now, free_now))
        a.maybe_shrink(keep_free_pages=0, fresh=False)
        new = [e for e in events if e[0] == "release"][released:]
        for _, seg in new:
            assert seg not in in_use
            run_start = clock.now
            for when, free in reversed(checks):
                if seg not in free:
                    break
                run_start = when
            assert clock.now - run_start >= hold_off - 1e-9, (seg, clock.now, run_start)
        released += len(new)
        if rng.random() < 0.02:  # load falls away now and then, so segments do go
            for chunk in held:
                a.free(chunk)
            held.clear()
    assert released > 3
    a.check_invariants()


def test_reuse_resets_hold_off() -> None:
    a, _, clock = make_alloc(hold_off_s=1.0)
    x = a.alloc(64)
    assert x is not None and a.committed_segments == 2
    a.free(x[-1:])  # page 64: segment 1 is empty
    assert a.maybe_shrink(now=0.0) == 0  # ... and seen so at t=0
    clock.now = 0.5
    y = a.alloc(1)
    assert y is not None and y.tolist() == [64]
    assert a.maybe_shrink(now=0.5) == 0  # in use: the hold-off starts over
    clock.now = 0.8
    a.free(y)
    assert a.maybe_shrink(now=0.8) == 0  # empty again from t=0.8
    assert a.maybe_shrink(now=1.5) == 0
    assert a.maybe_shrink(now=1.8) == 1
    a.check_invariants()


def test_min_committed_segments_and_never_used_segment() -> None:
    a, events, _ = make_alloc(min_committed_segments=2, hold_off_s=0.0)
    assert events == [("commit", 0), ("commit", 1)]
    assert a.ensure_free(200)
    assert a.committed_segments == 4
    # Committed but never used segments count as empty since commit.
    assert a.maybe_shrink() == 2
    assert a.committed_segments == 2
    a.check_invariants()


def test_release_callback_failure_restores_state() -> None:
    a, _, _ = make_alloc(hold_off_s=0.0)

    def boom(seg: int) -> None:
        raise RuntimeError("driver said no")

    assert a.ensure_free(100)
    a.on_release = boom
    before = a.free_pages.clone()
    with pytest.raises(RuntimeError, match="driver"):
        a.maybe_shrink()
    assert a.committed_segments == 2 and torch.equal(a.free_pages, before)
    a.check_invariants()
