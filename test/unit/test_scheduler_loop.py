"""The scheduler-loop hooks of segmented mode, on stand-ins for upstream's scheduler objects."""

from __future__ import annotations

import dataclasses
import types

from sglang_kvalloc.upstream.scheduler_loop import around_check_full_pool, iteration_demand_tokens


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
    assert iteration_demand_tokens(_scheduler([], running=5), draft_tokens=4) == 5 * 6
    # The last prefill batch's requests join the running batch before its decode step.
    with_last = _scheduler([], running=5)
    extend = types.SimpleNamespace(is_extend=lambda: True)
    with_last.last_batch = types.SimpleNamespace(reqs=[_req(10)] * 3, forward_mode=extend)
    assert iteration_demand_tokens(with_last) == (5 + 3) * 2
    with_last.last_batch.forward_mode = types.SimpleNamespace(is_extend=lambda: False)
    assert iteration_demand_tokens(with_last) == 5 * 2


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

    around_check_full_pool(check_full_pool, checker, PoolStats(a.available_size()))
    assert seen["available"] == 16  # 3 free + 13 withheld: nothing is reported as leaked
    # Once the memory is back, a retry lifts the ceiling and the pool is whole again.
    fail["on"] = False
    a._segments.retry_s = 0.0
    a.scheduler_step(12)
    assert a.withheld_size() == 0 and a.available_size() == 16
