"""The scheduler-loop hooks of segmented mode, on stand-ins for upstream's scheduler objects."""

from __future__ import annotations

import dataclasses
import types

import pytest
from decisions import decide
from sglang.srt.mem_cache.segmented import modes, scheduler_loop
from sglang.srt.mem_cache.segmented.scheduler_loop import iteration_demand_tokens

from sglang_kvalloc.upstream import plugin


def _req(n_input: int, n_output: int = 0) -> types.SimpleNamespace:
    return types.SimpleNamespace(origin_input_ids=[0] * n_input, output_ids=[0] * n_output)


def _scheduler(waiting, running=0, chunk=4096, page=1, chunked=None) -> types.SimpleNamespace:
    batch = types.SimpleNamespace(reqs=[_req(10)] * running, is_empty=lambda: running == 0)
    return types.SimpleNamespace(
        page_size=page,
        running_batch=batch,
        chunked_prefill_size=chunk,
        chunked_req=chunked,
        waiting_queue=waiting,
    )


def test_demand_covers_one_chunk_of_prefill_and_one_decode_step() -> None:
    assert iteration_demand_tokens(_scheduler([])) == 0
    # Two short requests: all of them (plus a page each of rounding).
    assert iteration_demand_tokens(_scheduler([_req(100), _req(50, 7)])) == 100 + 1 + 57 + 1
    # A long queue stops at one chunk, not summed whole; the request that crosses the chunk
    # boundary counts whole (upstream admits it as a chunked request, all of it reserved).
    many = [_req(3000) for _ in range(1000)]
    assert iteration_demand_tokens(_scheduler(many, chunk=4096)) == 2 * 3001
    assert iteration_demand_tokens(_scheduler([_req(100_000)] * 3, chunk=4096)) == 100_001
    # A chunked request in flight: its whole remaining input, whatever the chunk size.
    chunked = types.SimpleNamespace(origin_input_ids=[0] * 100_000, prefix_len=40_000)
    assert iteration_demand_tokens(_scheduler([], chunk=4096, chunked=chunked)) == 60_001
    # Without chunked prefill the whole queue may go in one batch.
    assert iteration_demand_tokens(_scheduler(many[:3], chunk=-1)) == 3 * 3001
    # Decode: a new page per running request (two with speculative draft tokens past a page).
    assert iteration_demand_tokens(_scheduler([], running=5, page=16)) == 5 * 2 * 16
    assert iteration_demand_tokens(_scheduler([], running=5), decode_slots=5) == 5 * 6
    # The last prefill batch's requests join the running batch before its decode step.
    with_last = _scheduler([], running=5)
    extend = types.SimpleNamespace(is_extend=lambda: True)
    with_last.last_batch = types.SimpleNamespace(reqs=[_req(10)] * 3, forward_mode=extend)
    assert iteration_demand_tokens(with_last) == (5 + 3) * 2
    with_last.last_batch.forward_mode = types.SimpleNamespace(is_extend=lambda: False)
    assert iteration_demand_tokens(with_last) == 5 * 2


@pytest.mark.parametrize(
    ("algorithm", "topk", "steps", "draft", "page", "expected"),
    [
        (None, None, None, None, 1, (1, 2)),
        ("EAGLE", 4, 3, 4, 1, (24, 24)),  # twice max(4 x 3, 4)
        ("EAGLE", 1, 3, 4, 1, (8, 8)),  # twice max(1 x 3, 4)
        ("EAGLE", 4, 3, 8, 16, (256, 271)),  # spec v2 tree: 2 pages x 4 branches, doubled
    ],
)
def test_decode_slots_are_upstreams_speculative_reserve(
    monkeypatch: pytest.MonkeyPatch, algorithm, topk, steps, draft, page, expected
) -> None:
    """With speculative decoding a decode step allocates upstream's own reserve per request
    (top-k x steps draft tokens, not only the verify tokens): the commit ahead of every
    iteration and the rows' reach count it, so the step's allocation finds its slots
    committed."""
    from sglang.srt import runtime_context
    from sglang.srt.mem_cache import allocation_sizing

    spec = types.SimpleNamespace(
        speculative_algorithm=algorithm,
        speculative_eagle_topk=topk,
        speculative_num_steps=steps,
        speculative_num_draft_tokens=draft,
    )
    monkeypatch.setattr(runtime_context, "get_spec", lambda: spec)
    monkeypatch.setattr(allocation_sizing, "get_spec", lambda: spec)
    monkeypatch.setattr(allocation_sizing, "max_speculative_num_draft_tokens", lambda: draft)
    monkeypatch.setattr(allocation_sizing, "get_alloc_page_size", lambda: page)
    assert scheduler_loop.decode_slots() == expected
    if algorithm is not None:
        reserve = allocation_sizing.get_alloc_reserve_per_decode()
        assert expected[0] == reserve
        # The row covers every position upstream's decode writes, wherever in a page the
        # request's committed length (here its length) stands.
        for length in range(1000, 1000 + page):
            kv = types.SimpleNamespace(kv_committed_len=length, kv_allocated_len=length)
            _, (written_up_to,), _ = allocation_sizing.page_aligned_decode_alloc_lens(
                [types.SimpleNamespace(kv=kv)], reserve=reserve, page_size=page
            )
            assert written_up_to <= length + expected[1]

    decide(modes.SEGMENTED)
    demands: list[int] = []
    allocator = types.SimpleNamespace(scheduler_step=demands.append, note_busy=lambda: None)
    scheduler = _scheduler([], running=3, page=page)
    scheduler.token_to_kv_pool_allocator = allocator
    scheduler.req_to_token_pool = types.SimpleNamespace()
    scheduler_loop.before_get_next_batch_to_run(scheduler)
    assert demands == [3 * (-(-expected[0] // page) + 1) * page]


def test_commit_ahead_serves_the_iteration_without_committing_in_alloc() -> None:
    from test_allocator_contracts import token_allocator

    a = token_allocator("segmented", size=16)  # segments of 4 slots
    seg = a._segments
    assert seg.committed_segments == 1
    a.scheduler_step(10)
    assert seg.num_free_committed >= 10
    committed = seg.committed_segments
    assert a.alloc(10) is not None
    assert seg.committed_segments == committed  # the alloc found them backed


def test_leak_identity_counts_withheld_tokens() -> None:
    from test_allocator_contracts import token_allocator

    a = token_allocator("segmented", size=16)
    decide(modes.SEGMENTED)
    fail = {"on": True}
    real_commit = a._segments.on_commit

    def flaky(seg: int) -> None:
        if fail["on"]:
            raise MemoryError("taken")
        real_commit(seg)

    a._segments.on_commit = flaky
    a.scheduler_step(12)  # commit ahead fails: the 13 slots of segments 1-4 are withheld
    assert a.withheld_size() == 13 and a.available_size() == 3
    seen = {}

    def check_full_pool(checker, ps, uncached=0):
        seen["available"] = ps.full_available_size
        return False, ""

    checker = types.SimpleNamespace(token_to_kv_pool_allocator=a)

    @dataclasses.dataclass
    class PoolStats:
        full_available_size: int

    plugin.around_check_full_pool(check_full_pool, checker, PoolStats(a.available_size()))
    assert seen["available"] == 16  # 3 free + 13 withheld: nothing is reported as leaked
    # Once the memory is back, a retry lifts the ceiling and the pool is whole again.
    fail["on"] = False
    a._segments.retry_s = 0.0
    a.scheduler_step(12)
    assert a.withheld_size() == 0 and a.available_size() == 16


@pytest.mark.parametrize("flushed", [True, False])
def test_a_flushed_cache_gives_its_segments_back_at_once(
    monkeypatch: pytest.MonkeyPatch, flushed: bool
) -> None:
    """`/flush_cache` empties the pool: with a hold-off that never passes (`inf`), the
    segments still go back at the flush, down to the first; a flush upstream refused (work
    pending) releases nothing."""
    from sglang.srt.mem_cache.segmented.runtime import RUNTIME
    from test_allocator_contracts import token_allocator

    monkeypatch.setattr(RUNTIME.settings, "hold_off_s", float("inf"))
    decide(modes.SEGMENTED)
    a = token_allocator("segmented", size=16)  # segments of 4 slots
    taken = a.alloc(14)
    assert taken is not None and a._segments.committed_segments == 4
    a.free(taken)
    assert a.maybe_shrink() == 0  # the hold-off never passes
    a.clear()  # what upstream's Scheduler.flush_cache does to the allocator
    scheduler = types.SimpleNamespace(token_to_kv_pool_allocator=a)
    assert scheduler_loop.after_flush_cache(flushed, scheduler) is None  # upstream's result
    assert a._segments.committed_segments == (1 if flushed else 4)
    assert a.available_size() == 16 and a.alloc(16) is not None  # all still allocatable


class _AdmissionPool:
    """The two calls `row_admission` makes of the lazy req_to_token pool, recorded."""

    def __init__(self, ready_rows: int) -> None:
        self.ready_rows = ready_rows
        self.promised = 0

    def admit_row(self, length: int) -> bool:
        if self.promised >= self.ready_rows:
            return False
        self.promised += 1
        return True

    def unadmit_row(self) -> None:
        self.promised -= 1


def test_admission_takes_no_row_it_cannot_back_and_a_request_not_added_gives_its_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where rows are committed explicitly, a request needing a new row waits (OTHER) once the
    ready rows are promised; a request upstream refused after admission (here: the third,
    refused by upstream's own budget) gives its promise back by the next request, so that one
    gets the row. A request that holds its row already promises nothing."""
    from sglang.srt.managers.schedule_policy import AddReqResult
    from sglang.srt.mem_cache.segmented.runtime import RUNTIME
    from sglang.srt.plugins.hook_registry import HookType, _wrap_fn

    decide(modes.SEGMENTED, explicit_commits=True)
    pool = _AdmissionPool(ready_rows=3)
    monkeypatch.setattr(RUNTIME.state, "req_to_token_pool", pool)
    monkeypatch.setattr(scheduler_loop, "decode_slots", lambda: (1, 2))

    class Adder:
        def __init__(self) -> None:
            self.can_run_list: list[object] = []

        def add_one_req(self, req, has_chunked_req, truncation_align_size):  # noqa: ANN001
            if req.refused:
                return AddReqResult.NO_TOKEN
            self.can_run_list.append(req)
            return AddReqResult.CONTINUE

    add = _wrap_fn(Adder.add_one_req, plugin.around_add_one_req, HookType.AROUND)
    adder = Adder()

    def req(refused: bool = False, holds: bool = False) -> types.SimpleNamespace:
        r = _req(8)
        r.refused, r.kv = refused, types.SimpleNamespace(holds_kv=holds)
        return r

    results = [add(adder, r, False, None) for r in (req(), req(), req(refused=True), req())]
    assert results == [AddReqResult.CONTINUE] * 2 + [AddReqResult.NO_TOKEN, AddReqResult.CONTINUE]
    assert len(adder.can_run_list) == 3 and pool.promised == 3
    assert add(adder, req(), False, None) == AddReqResult.OTHER  # no ready row left: waits
    assert add(adder, req(holds=True), False, None) == AddReqResult.CONTINUE
    assert pool.promised == 3 and len(adder.can_run_list) == 4
    decide(modes.SEGMENTED)  # rows committed by first write (the CPU): no admission check
    assert add(Adder(), req(), False, None) == AddReqResult.CONTINUE and pool.promised == 3
