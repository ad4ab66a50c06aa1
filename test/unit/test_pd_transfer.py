"""PD disaggregation, stage 2 (issue 36): the KV pool committed on demand under PD. The transfer
engine registers committed segments only (each as it is committed, deregistered before its
memory goes), the decode side commits ahead for its pre-allocation queue and admits by
committed memory, and a transfer outside committed memory is refused."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch
from decisions import decide
from sglang.srt.disaggregation.mooncake.conn import MooncakeKVManager
from sglang.srt.mem_cache.segmented import kv_allocators, pd_transfer, pool_kind, scheduler_loop
from sglang.srt.mem_cache.segmented.buffers import SegmentedBuffers
from sglang.srt.mem_cache.segmented.cpu_backing import CpuBackingFactory
from sglang.srt.mem_cache.segmented.geometry import SegmentGeometry
from sglang.srt.mem_cache.segmented.runs import split_runs_at_segment_starts
from sglang.srt.mem_cache.segmented.runtime import RUNTIME

from sglang_kvalloc.upstream import plugin

SIZE = 4096
SEGMENT = 1024  # 4 segments; the first holds the padding slot
ROW_BYTES = [64, 64]  # one layer's K and V rows
AUX = (0xA000, 4096)  # the metadata buffer upstream registers beside the KV


class RecordingEngine:
    """Upstream's `MooncakeTransferEngine` calls, recorded; what it answers is set per test."""

    def __init__(self, buffers: SegmentedBuffers) -> None:
        self.buffers = buffers
        self.registered: dict[int, int] = {}
        self.answer = 0
        self.committed_when_deregistered: list[bool] = []

    def batch_register(self, ptrs: list[int], lengths: list[int]) -> int:
        if not self.answer:
            self.registered.update(zip(ptrs, lengths, strict=True))
        return self.answer

    def batch_deregister(self, ptrs: list[int]) -> int:
        # The memory must still be there while the engine lets go of it.
        self.committed_when_deregistered.append(self.buffers.committed_segments > 0)
        for ptr in ptrs:
            del self.registered[ptr]
        return 0


@pytest.fixture
def allocator(monkeypatch: pytest.MonkeyPatch) -> kv_allocators.SegmentedTokenToKVPoolAllocator:
    decide("segmented")
    monkeypatch.setattr(RUNTIME.settings, "hold_off_s", 0.0)
    geometry = SegmentGeometry(SIZE + 1, SEGMENT, 1)
    buffers = SegmentedBuffers.create(geometry, ROW_BYTES, CpuBackingFactory())
    RUNTIME.kv_buffers.append(buffers)
    kvcache = types.SimpleNamespace(segmented_buffers=buffers)
    made = kv_allocators.SegmentedTokenToKVPoolAllocator(SIZE, torch.float32, "cpu", kvcache, False)
    RUNTIME.state.allocator = made
    return made


def _manager(buffers: SegmentedBuffers) -> types.SimpleNamespace:
    """A Mooncake KV manager's registration state, as upstream's `_registerable_regions`
    reads it: each KV buffer whole (the reservation), then the metadata buffer."""
    bases = pd_transfer._base_addresses(buffers)
    kv_args = types.SimpleNamespace(
        kv_data_ptrs=bases,
        kv_data_lens=[backing.reserved_bytes for backing in buffers.backings],
        aux_data_ptrs=[AUX[0]],
        aux_data_lens=[AUX[1]],
        state_data_ptrs=[],
        state_data_lens=[],
    )
    return types.SimpleNamespace(kv_args=kv_args, engine=RecordingEngine(buffers))


def _upstream_regions(manager: types.SimpleNamespace) -> list[tuple[int, int]]:
    original = MooncakeKVManager._registerable_regions
    original = getattr(original, "__wrapped__", original)  # upstream's, hooked or not
    return plugin.around_registerable_regions(original, manager)  # type: ignore[arg-type]


def _segment_regions(buffers: SegmentedBuffers, seg: int) -> dict[int, int]:
    bases = pd_transfer._base_addresses(buffers)
    return {bases[b] + buffers.byte_range(b, seg)[0]: buffers.byte_range(b, seg)[1] for b in (0, 1)}


def test_the_transfer_engine_registers_committed_segments_only(
    allocator: kv_allocators.SegmentedTokenToKVPoolAllocator,
) -> None:
    buffers = RUNTIME.kv_buffers[0]
    manager = _manager(buffers)
    engine = manager.engine
    # At start: the first segment of each KV buffer (not the 4-segment reservation), and the
    # metadata buffer as upstream registers it.
    regions = _upstream_regions(manager)
    assert dict(regions) == {**_segment_regions(buffers, 0), AUX[0]: AUX[1]}
    engine.batch_register(*map(list, zip(*regions, strict=True)))
    pd_transfer.after_register_buffer_to_engine(None, manager)  # type: ignore[arg-type]
    # A commit registers the new segment before any of its pages is handed out, and no run
    # of slots handed out crosses a segment start (a transfer block spanning two registered
    # segments is refused by Mooncake).
    slots = allocator.alloc(2 * SEGMENT)
    assert slots is not None and buffers.committed_segments == 3
    assert sorted(slots.tolist()) == list(range(1, 2 * SEGMENT + 1))
    assert not _crossings(slots)
    assert engine.registered == {
        **_segment_regions(buffers, 0),
        **_segment_regions(buffers, 1),
        **_segment_regions(buffers, 2),
        AUX[0]: AUX[1],
    }
    # Freed and released: deregistered first, while the memory was still committed.
    allocator.free(slots)
    assert allocator.maybe_shrink_now() == 2
    assert engine.registered == {**_segment_regions(buffers, 0), AUX[0]: AUX[1]}
    assert engine.committed_when_deregistered == [True, True]
    # The teardown deregisters what is committed then, and nothing follows the segments after.
    pd_transfer.before_deregister_buffer_to_engine(manager)  # type: ignore[arg-type]
    assert dict(_upstream_regions(manager)) == {**_segment_regions(buffers, 0), AUX[0]: AUX[1]}
    again = allocator.alloc(SEGMENT)
    assert again is not None and buffers.committed_segments == 2
    assert _segment_regions(buffers, 1).keys().isdisjoint(engine.registered)


def _crossings(slots: torch.Tensor) -> list[int]:
    """Positions where a run of consecutive slots crosses a segment start."""
    listed = slots.tolist()
    return [
        i
        for i in range(1, len(listed))
        if listed[i] == listed[i - 1] + 1 and listed[i] % SEGMENT == 0
    ]


@pytest.mark.parametrize("seed", range(20))
def test_no_run_of_slots_handed_out_crosses_a_segment_start(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    segment = int(torch.randint(3, 9, (1,), generator=generator))
    # Runs of consecutive pages with gaps, like a free list after frees.
    runs = [
        torch.arange(s, s + int(n))
        for s, n in zip(
            torch.randint(0, 20 * segment, (6,), generator=generator).tolist(),
            torch.randint(1, 3 * segment, (6,), generator=generator).tolist(),
            strict=True,
        )
    ]
    pages = torch.unique(torch.cat(runs))[: int(torch.randint(2, 60, (1,), generator=generator))]
    out = split_runs_at_segment_starts(pages, segment)
    assert sorted(out.tolist()) == sorted(pages.tolist())
    listed = out.tolist()
    assert not [
        i
        for i in range(1, len(listed))
        if listed[i] == listed[i - 1] + 1 and listed[i] % segment == 0
    ]


def test_a_segment_the_engine_cannot_register_is_a_failed_commit(
    allocator: kv_allocators.SegmentedTokenToKVPoolAllocator,
) -> None:
    buffers = RUNTIME.kv_buffers[0]
    manager = _manager(buffers)
    pd_transfer.after_register_buffer_to_engine(None, manager)  # type: ignore[arg-type]
    manager.engine.answer = -1
    # Requests queue as for a full pool (upstream's allocation returns None), the segment's
    # memory goes back, and the failure is counted.
    assert allocator.alloc(SEGMENT + 8) is None
    assert buffers.committed_segments == 1
    assert allocator.segment_stats()["commit_failures"] == 1
    assert allocator.withheld_size() > 0


def test_a_transfer_outside_committed_memory_is_refused(
    allocator: kv_allocators.SegmentedTokenToKVPoolAllocator,
) -> None:
    limit = allocator.committed_slot_limit()
    assert limit == SEGMENT  # the first segment: slots 0..1023
    pd_transfer.check_committed(allocator, torch.arange(1, limit), "fits")
    pd_transfer.check_committed(allocator, torch.empty(0, dtype=torch.int64), "nothing")
    with pytest.raises(pd_transfer.TransferOutsideCommittedMemory, match=f"slot {limit} "):
        pd_transfer.check_committed(allocator, torch.tensor([3, limit]), "request r1's KV")
    assert allocator.alloc(limit) is not None  # commits the next segment
    pd_transfer.check_committed(allocator, torch.tensor([limit]), "now committed")


def _decode_queue(allocator, prompts, max_new, retracted=()) -> types.SimpleNamespace:
    """A decode server's pre-allocation queue whose admission rules are upstream's own
    (`DecodePreallocQueue` methods bound to it), over ``allocator``."""
    from sglang.srt.disaggregation.decode import DecodePreallocQueue

    def req(n: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(
            origin_input_ids=[7] * n,
            output_ids=[],
            sampling_params=types.SimpleNamespace(max_new_tokens=max_new),
        )

    queue = types.SimpleNamespace(
        queue=[types.SimpleNamespace(req=req(n)) for n in prompts],
        retracted_queue=[req(n) for n in retracted],
        transfer_queue=types.SimpleNamespace(queue=[]),
        token_to_kv_pool_allocator=allocator,
        num_reserved_decode_tokens=100,
    )
    for name in (
        "_required_admission_tokens",
        "_required_alloc_tokens",
        "_active_reserved_tokens",
        "_active_req_count",
    ):
        setattr(queue, name, getattr(DecodePreallocQueue, name).__get__(queue))
    queue._rebootstrap_prefill_len = DecodePreallocQueue._rebootstrap_prefill_len
    queue._pre_alloc_fill_len = DecodePreallocQueue._pre_alloc_fill_len
    queue.scheduler = types.SimpleNamespace(
        token_to_kv_pool_allocator=allocator,
        disagg_decode_prealloc_queue=queue,
        running_batch=types.SimpleNamespace(reqs=[]),
        waiting_queue=[],
        last_batch=None,
        page_size=1,
    )
    return queue


def test_the_decode_side_commits_ahead_for_its_queue_and_admits_by_committed_memory(
    allocator: kv_allocators.SegmentedTokenToKVPoolAllocator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No speculative decoding: one slot per decode step (upstream's spec settings unpublished).
    monkeypatch.setattr(scheduler_loop, "decode_slots", lambda: (1, 2))
    # A short prompt with many new tokens: upstream admits it by input + clipped new tokens,
    # more than its KV and reserve (the commit-ahead must cover that, or it waits forever).
    queue = _decode_queue(allocator, prompts=[300, 200], max_new=600, retracted=[100])
    waiting = [d.req for d in queue.queue] + queue.retracted_queue
    required = [queue._required_admission_tokens(r, len(r.origin_input_ids), 0, 0) for r in waiting]
    assert required == [900, 800, 700]  # input + new tokens, not input + reserve

    def upstream_budget(q: types.SimpleNamespace) -> int:  # upstream's, less the reserves
        return q.token_to_kv_pool_allocator.available_size() - q._active_reserved_tokens()

    # Before the commit-ahead, only the first segment's free slots can be admitted.
    before = plugin.around_allocatable_token_budgets(upstream_budget, queue)  # type: ignore[arg-type]
    assert before == allocator.committed_available_size() < sum(required)
    pd_transfer.before_pop_preallocated(queue)  # type: ignore[arg-type]
    # Every queued and retracted request's requirement, and the reserve of each, committed.
    assert allocator.committed_available_size() >= sum(required) + 100 * len(waiting)
    after = plugin.around_allocatable_token_budgets(upstream_budget, queue)  # type: ignore[arg-type]
    assert after == allocator.committed_available_size() >= sum(required)
    assert RUNTIME.kv_buffers[0].committed_segments == 3  # 2,700 tokens + slot 0


def test_pd_kv_on_demand_where_registrations_can_follow_the_segments() -> None:
    def args(mode: str, backend: str) -> types.SimpleNamespace:
        return types.SimpleNamespace(
            disaggregation_mode=mode, disaggregation_transfer_backend=backend
        )

    assert pool_kind.pd_kv_on_demand_problem(args("null", "mooncake"), "mla") is None
    assert pool_kind.pd_kv_on_demand_problem(args("decode", "mooncake"), "mha") is None
    assert pool_kind.pd_kv_on_demand_problem(args("prefill", "fake"), "mha") is None
    radix = pool_kind.pd_kv_on_demand_problem(
        types.SimpleNamespace(**vars(args("decode", "mooncake")),
                              disaggregation_decode_enable_radix_cache=True),
        "mha",
    )  # fmt: skip
    assert radix is not None and "--disaggregation-decode-enable-radix-cache" in radix
    nixl = pool_kind.pd_kv_on_demand_problem(args("decode", "nixl"), "mha")
    assert nixl is not None and "--disaggregation-transfer-backend nixl" in nixl
    mla = pool_kind.pd_kv_on_demand_problem(args("decode", "mooncake"), "mla")
    assert mla is not None and "mla" in mla


def test_only_pd_servers_import_mooncake_and_get_its_hooks() -> None:
    """A plain server never imports upstream's Mooncake module (it registers a Prometheus
    counter); where upstream imports it, the plugin's hooks on it are applied then."""
    code = (
        "import sys\n"
        "import sglang.srt.entrypoints.engine\n"  # loads the plugins, as a server does
        "import sglang.srt.managers.scheduler\n"
        "assert 'sglang.srt.disaggregation.mooncake.conn' not in sys.modules\n"
        "from sglang.srt.disaggregation.mooncake.conn import MooncakeKVManager as M\n"
        "names = ('_registerable_regions', 'register_buffer_to_engine',"
        " 'deregister_buffer_to_engine')\n"
        "print(all(hasattr(getattr(M, n), '__wrapped__') for n in names))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "True"
