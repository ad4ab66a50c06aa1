"""Upstream's CUDA-side contracts, checked on the CPU through the fake driver (issue 21).

The device is treated as CUDA: the plugin's hooks see ``cuda``, its backings are the CUDA VMM
backing over `fake_cuda.FakeDriver` (whose scratch granule is shared, as on a GPU: a write
to one uncommitted address is seen at every other), and upstream's rotary classes are built
as their CUDA branch builds them.
"""

from __future__ import annotations

import time
import types

import pytest
import torch
from decisions import decide, note_request
from fake_cuda import MIB, FakeDriver, FakeVmmApi
from sglang.srt.mem_cache.segmented import (
    backing_choice,
    kv_allocators,
    kv_pools,
    lazy_req_to_token,
    modes,
    pool_config,
    scheduler_loop,
)
from sglang.srt.mem_cache.segmented.cuda_backing import (
    CudaBackingFactory,
    CudaVmmBacking,
    VmmDevice,
    VmmMappingLostError,
)
from sglang.srt.mem_cache.segmented.runtime import RUNTIME

from sglang_kvalloc.upstream import plugin

G = 2 * MIB


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> CudaBackingFactory:
    """Segmented settings on a fake GPU: the CUDA backing factory over the fake driver."""
    driver = FakeDriver(capacity=1536 * MIB, min_granularity=G, dirty_new_memory=True)
    factory = CudaBackingFactory(VmmDevice(FakeVmmApi(driver), 0, background_refill=False))
    monkeypatch.setattr(RUNTIME, "backings", factory)
    monkeypatch.setattr(backing_choice, "open_backings", lambda device: factory)
    monkeypatch.setattr(RUNTIME, "device", "cuda:0")
    # Rows and tables only: these tests' KV allocators are stand-ins (one test decides again).
    decide(modes.SEGMENTED, explicit_commits=True, kv_pool_problem="a stand-in KV allocator")
    return factory


def _cuda_rope(monkeypatch: pytest.MonkeyPatch, head: int, llama3: bool = False) -> torch.nn.Module:
    """Upstream's rotary module as its CUDA branch builds it (`_is_cuda`: float32 cache)."""
    from sglang.srt.layers.rotary_embedding import base, rope_variant

    monkeypatch.setattr(base, "_is_cuda", True)
    monkeypatch.setattr(base, "_is_cpu", False)
    if llama3:
        return rope_variant.Llama3RotaryEmbedding(
            head, head, 8192, 500_000, True, torch.bfloat16, 8.0, 1.0, 4.0, 8192
        )
    return base.RotaryEmbedding(head, head, 8192, 500_000, True, torch.bfloat16)


def _model_config(context: int) -> types.SimpleNamespace:
    hf_text = types.SimpleNamespace(max_position_embeddings=8192)
    return types.SimpleNamespace(context_len=context, dtype=torch.bfloat16, hf_text_config=hf_text)


@pytest.fixture
def upstream_reserve(monkeypatch: pytest.MonkeyPatch):
    """Upstream's `reserve_rope_cache_for_long_sequences`, its runtime bags stubbed."""
    from sglang.srt.utils import common

    monkeypatch.setattr(common, "get_model", lambda: types.SimpleNamespace(context_length=None))
    spec = types.SimpleNamespace(speculative_num_steps=0, speculative_num_draft_tokens=0)
    monkeypatch.setattr(common, "get_spec", lambda: spec)
    # Upstream's own function, not the plugin's hook where an earlier test applied hooks.
    return getattr(
        common.reserve_rope_cache_for_long_sequences,
        "__wrapped__",
        common.reserve_rope_cache_for_long_sequences,
    )


def _wrap(module: torch.nn.Module) -> torch.nn.Module:
    root = torch.nn.Module()
    root.rotary_emb = module
    return root


@pytest.mark.parametrize("llama3", [False, True])
def test_segmented_rope_cache_stays_float32_and_equals_upstream_to_2m_positions(
    monkeypatch: pytest.MonkeyPatch, fake_gpu, upstream_reserve, llama3: bool
) -> None:
    note_request(modes.SEGMENTED)
    context = 2_000_000
    module, reference = _cuda_rope(monkeypatch, 64, llama3), _cuda_rope(monkeypatch, 64, llama3)
    assert module.cos_sin_cache.dtype == torch.float32 and not module.use_fallback_kernel
    plugin.around_reserve_rope_cache(upstream_reserve, _wrap(module), _model_config(context))
    upstream_reserve(_wrap(reference), _model_config(context))
    assert module.cos_sin_cache.dtype == torch.float32  # upstream's JIT kernel requires it
    assert module.cos_sin_cache.shape == reference.cos_sin_cache.shape  # the reservation
    address = module.cos_sin_cache.data_ptr()
    RUNTIME.rope.commit_up_to(context)  # what the pool hook commits: up to the capacity
    (fixed,) = RUNTIME.rope.caches
    assert fixed.rows == min(reference.cos_sin_cache.shape[0], context + fixed.margin)
    assert torch.equal(module.cos_sin_cache[:context], reference.cos_sin_cache[:context])
    assert module.cos_sin_cache.data_ptr() == address


def test_rope_under_upstreams_fallback_kernel_is_stored_as_its_forward_casts_it(
    monkeypatch: pytest.MonkeyPatch, fake_gpu, upstream_reserve
) -> None:
    """Head size 96 on CUDA: upstream's forward casts the cache to the activation dtype
    (a reallocation), so the fixed cache is stored in that dtype already."""
    note_request(modes.SEGMENTED)
    module = _cuda_rope(monkeypatch, 96)
    assert module.use_fallback_kernel
    plugin.around_reserve_rope_cache(upstream_reserve, _wrap(module), _model_config(100_000))
    assert module.cos_sin_cache.dtype == torch.bfloat16


def test_auto_at_the_models_own_context_leaves_rope_exactly_as_upstream(
    monkeypatch: pytest.MonkeyPatch, fake_gpu, upstream_reserve
) -> None:
    note_request(modes.AUTO)

    def no_backing(device: str) -> None:
        raise AssertionError("auto at an ordinary context must not open a backing")

    monkeypatch.setattr(backing_choice, "open_backings", no_backing)
    module, reference = _cuda_rope(monkeypatch, 128), _cuda_rope(monkeypatch, 128)
    model, twin = _wrap(module), _wrap(reference)
    plugin.around_reserve_rope_cache(upstream_reserve, model, _model_config(8192))
    upstream_reserve(twin, _model_config(8192))
    ours = dict(model.named_buffers())
    theirs = dict(twin.named_buffers())
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert tensor.dtype == theirs[name].dtype and torch.equal(tensor, theirs[name])
    assert not RUNTIME.rope


def test_auto_past_the_model_then_static_commits_fixed_caches_whole(
    monkeypatch: pytest.MonkeyPatch, fake_gpu, upstream_reserve
) -> None:
    """auto reserved a fixed cache (context past the model); settling on static commits it
    whole, so positions past the model's own read upstream's values, not zeros."""
    note_request(modes.AUTO)
    decide(modes.STATIC, requested=modes.AUTO)
    module, reference = _cuda_rope(monkeypatch, 64), _cuda_rope(monkeypatch, 64)
    plugin.around_reserve_rope_cache(upstream_reserve, _wrap(module), _model_config(40_000))
    upstream_reserve(_wrap(reference), _model_config(40_000))
    assert RUNTIME.rope
    calls = []
    config = types.SimpleNamespace(max_total_num_tokens=50_000, max_running_requests=8)

    def resolve(configurator, *args, **kwargs):
        calls.append(RUNTIME.rope.committed_bytes)
        return config

    configurator = types.SimpleNamespace(_resolve_memory_pool_config=lambda: resolve(None))
    settled = pool_config.settle_run_time_memory(configurator, config, (), {})
    assert settled is config and len(calls) == 1 and calls[0] > 0  # the budget measured again
    assert torch.equal(module.cos_sin_cache, reference.cos_sin_cache)


class _Kv:
    """A request's KV bookkeeping as upstream keeps it (`holds_kv`: it has a row)."""

    def __init__(self, row: int | None) -> None:
        self.req_pool_idx = row
        self.kv_allocated_len = self.kv_committed_len = 1

    @property
    def holds_kv(self) -> bool:
        return self.req_pool_idx is not None


def _req(n_tokens: int, row: int | None = None) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        origin_input_ids=[0] * n_tokens, output_ids=[], extend_end=n_tokens, kv=_Kv(row)
    )


def _scheduler(pool: lazy_req_to_token.SegmentedReqToTokenPool, running: list, waiting: list):
    """A scheduler whose KV allocator is upstream's own (no `scheduler_step`)."""
    return types.SimpleNamespace(
        token_to_kv_pool_allocator=types.SimpleNamespace(),
        req_to_token_pool=pool,
        running_batch=types.SimpleNamespace(reqs=running, is_empty=lambda: not running),
        waiting_queue=waiting,
        chunked_req=None,
        is_fully_idle=lambda: not running and not waiting,
    )


@pytest.fixture
def no_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler_loop, "decode_slots", lambda: (1, 2))


def test_rows_grow_before_decode_whatever_the_kv_allocator(fake_gpu, no_spec) -> None:
    """Upstream's own KV pool (DSA, FP4 KV, ...) with the lazy req_to_token: decode positions
    past a row's committed granules are committed inside upstream's decode-memory check,
    instead of landing on the scratch page every uncommitted row reads."""
    context = 2_000_000  # 8 MB rows: 4 granules each
    pool = lazy_req_to_token.SegmentedReqToTokenPool(4, context, "cpu", False)
    req = _req(400_000)
    (row,) = pool.alloc([req])  # row 4: the last free one
    req.output_ids = [1] * 200_000  # decoded far past the prompt's granule
    scheduler = _scheduler(pool, [req], [])
    scheduler_loop.before_get_next_batch_to_run(scheduler)
    batch = types.SimpleNamespace(reqs=[req], req_to_token_pool=pool)
    assert plugin.around_check_decode_mem(lambda b, s=None: True, batch)
    position = len(req.origin_input_ids) + len(req.output_ids)
    pool.req_to_token[row, position] = 12345  # the decode step's write
    # Rows 1 and 2 are all uncommitted: they read the shared scratch granule, untouched.
    assert int(pool.req_to_token[1:3].count_nonzero()) == 0


def test_row_zero_is_zeroed_like_upstreams_table(fake_gpu) -> None:
    pool = lazy_req_to_token.SegmentedReqToTokenPool(4, 1_000_000, "cpu", False)
    committed = pool._row_commits.covered_items(0, 4)
    assert committed > 0 and int(pool.req_to_token[0, :committed].count_nonzero()) == 0


def test_a_row_that_cannot_be_committed_is_a_full_pool_not_a_leak(fake_gpu, no_spec) -> None:
    driver = fake_gpu.device.api.driver
    pool = lazy_req_to_token.SegmentedReqToTokenPool(4, 2_000_000, "cpu", False)
    free_before, held_before = pool.available_size(), driver.physical_bytes
    driver.capacity = held_before  # the device is full
    assert pool.alloc([_req(1_000_000)]) is None  # upstream reports its pool exhausted
    assert pool.available_size() == free_before and driver.physical_bytes == held_before
    driver.capacity = 1536 * MIB
    # Decode: the check fails (upstream retracts, or aborts the last request) and says so.
    req = _req(10)
    (row,) = pool.alloc([req])
    req.output_ids = [1] * 900_000
    agreed: list[int] = []
    pool._agree = lambda value: agreed.append(value) or value
    batch = types.SimpleNamespace(reqs=[req], req_to_token_pool=pool)
    driver.capacity = driver.physical_bytes
    assert not plugin.around_check_decode_mem(lambda b, s=None: True, batch)
    assert agreed == [0] and pool.row_commit_failures == 2
    driver.capacity = 1536 * MIB
    assert plugin.around_check_decode_mem(lambda b, s=None: True, batch)  # memory is back
    assert agreed == [0, 1]
    assert plugin.around_check_decode_mem(lambda b, s=None: True, batch)
    assert agreed == [0, 1]  # nothing to commit: no agreement (no collective) at all


def test_admission_takes_no_row_the_device_cannot_back(fake_gpu, no_spec) -> None:
    """Upstream raises when a row cannot be allocated: admission promises each new row the
    granules it commits, within what every rank has ready, and a request past that waits."""
    driver = fake_gpu.device.api.driver
    pool = lazy_req_to_token.SegmentedReqToTokenPool(8, 2_000_000, "cpu", False)
    big, small = _req(1_500_000), _req(100)  # 6 MB of row (4 granules), 400 B (1)
    scheduler = _scheduler(pool, [], [big, small])
    driver.capacity = driver.physical_bytes + 2 * G
    scheduler_loop.before_get_next_batch_to_run(scheduler)
    assert not pool.admit_row(1_500_002)  # waits: 4 granules, 2 ready
    assert pool.admit_row(102)
    (row,) = pool.alloc([small])
    assert pool.rows_cover([(row, 102)])
    driver.capacity = 1536 * MIB
    scheduler.waiting_queue[:] = [big]
    scheduler_loop.before_get_next_batch_to_run(scheduler)
    assert pool.admit_row(1_500_002)
    pool.unadmit_row()  # upstream did not add it after all: the promise goes back
    assert pool.admit_row(1_500_002)
    (row,) = pool.alloc([big])
    assert pool.rows_cover([(row, 1_500_001)])


def test_rows_are_handed_out_in_the_order_admission_counted_them(fake_gpu) -> None:
    pool = lazy_req_to_token.SegmentedReqToTokenPool(8, 100_000, "cpu", False)
    expected = [pool.free_slots[-1], pool.free_slots[-2], pool.free_slots[-3]]
    assert pool.alloc([_req(10), _req(10), _req(10)]) == expected


def test_run_time_room_is_kept_out_of_the_kv_budget(
    monkeypatch: pytest.MonkeyPatch, fake_gpu
) -> None:
    from sglang.srt.mem_cache import kv_cache_configurator

    monkeypatch.setattr(kv_cache_configurator, "get_req_to_token_extra_context_len", lambda: 0)
    monkeypatch.setattr(pool_config, "kv_pool_bytes", lambda c, config: 20_000_000_000)
    decide(modes.SEGMENTED, explicit_commits=True)
    monkeypatch.setattr(RUNTIME.state, "run_time_room_bytes", 0)
    config = types.SimpleNamespace(max_total_num_tokens=1_000_000, max_running_requests=1024)
    configurator = types.SimpleNamespace(
        is_draft_worker=False, model_config=types.SimpleNamespace(context_len=10_000_000)
    )
    measured = []

    def resolve(c, *args, **kwargs):
        measured.append(plugin.around_profile_available_bytes(lambda c: 80_000_000_000, c))
        return config

    configurator._resolve_memory_pool_config = lambda: resolve(configurator)
    pool_config.settle_run_time_memory(configurator, config, (), {})
    # A 10M-context table is far past auto's 5% share: the room beyond it is kept free.
    room = 1024 * G + 4 * 1_000_000 - 1_000_000_000
    assert RUNTIME.state.run_time_room_bytes == room and measured == [80_000_000_000 - room]


def test_a_failed_map_rolls_back_whole_or_refuses_to_go_on(fake_gpu) -> None:
    driver = fake_gpu.device.api.driver
    backing = CudaVmmBacking(8 * G, fake_gpu.device)
    view = backing.tensor(torch.uint8, (8 * G,))
    driver.fail_next("cuMemMap", times=2)  # the real map, then the first scratch remap
    with pytest.raises(MemoryError):
        backing.commit(0, 2 * G)
    assert int(view[: 2 * G].count_nonzero()) == 0  # scratch everywhere again (retried)
    driver.fail_next("cuMemMap", times=3)  # the scratch remap fails twice: a hole
    with pytest.raises(VmmMappingLostError):
        backing.commit(2 * G, 2 * G)
    with pytest.raises(VmmMappingLostError):
        backing.commit(6 * G, G)  # the backing refuses to go on


def test_the_refill_thread_waits_while_a_graph_is_captured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sglang.srt.mem_cache.segmented import attention_graph_buffers

    driver = FakeDriver(capacity=256 * MIB, min_granularity=G)
    device = VmmDevice(FakeVmmApi(driver), 0, background_refill=True)
    monkeypatch.setattr(RUNTIME, "backings", CudaBackingFactory(device))
    seen: list[int] = []

    def capture(runner: object) -> None:
        before = driver.calls.get("cuMemCreate", 0)
        device.keep_spares(G, 4)  # the refill thread is woken ...
        time.sleep(0.3)
        seen.append(driver.calls.get("cuMemCreate", 0) - before)  # ... and waits

    attention_graph_buffers.around_capture(capture, types.SimpleNamespace())
    deadline = time.monotonic() + 5
    while device.spare_bytes < 4 * G and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen == [0] and device.spare_bytes == 4 * G  # created once the capture ended
    device.close()


def test_steady_serving_makes_no_device_synchronize(
    monkeypatch: pytest.MonkeyPatch, fake_gpu, no_spec
) -> None:
    """A scheduler-like trace over the fake GPU: requests arrive, decode and finish every
    iteration (rows committed, grown, freed and reused): no device synchronize in any
    iteration but those that commit a new KV segment (growth). Idle release is counted."""
    import random

    monkeypatch.setattr(RUNTIME.settings, "segment_tokens", 4096)
    api = fake_gpu.device.api
    kv = kv_pools.SegmentedMHATokenToKVPool(60_000, 1, torch.float32, 1, 512, 1, "cpu", False)
    allocator = kv_allocators.SegmentedTokenToKVPoolAllocator(
        60_000, torch.float32, "cpu", kv, False
    )
    pool = lazy_req_to_token.SegmentedReqToTokenPool(16, 1_000_000, "cpu", False)
    running: list = []
    waiting: list = []
    scheduler = _scheduler(pool, running, waiting)
    scheduler.token_to_kv_pool_allocator = allocator
    decide(modes.SEGMENTED, explicit_commits=True)
    scheduler.page_size, scheduler.chunked_prefill_size, scheduler.last_batch = 1, 8192, None
    rng = random.Random(0)
    per_iteration: list[int] = []
    growth: list[bool] = []
    for _ in range(300):
        before, commits = api.syncs, allocator._segments.commits
        if rng.random() < 0.5 and len(running) + len(waiting) < 12:
            waiting.append(_req(rng.randrange(10, 3000)))
        scheduler_loop.before_get_next_batch_to_run(scheduler)
        admitted = waiting[: pool.available_size()]
        del waiting[: len(admitted)]
        if admitted:
            assert pool.alloc(admitted) is not None
            for req in admitted:
                req.kv_slots = allocator.alloc(len(req.origin_input_ids))
            running.extend(admitted)
        batch = types.SimpleNamespace(reqs=running, req_to_token_pool=pool)
        assert plugin.around_check_decode_mem(lambda b, s=None: True, batch)
        for req in list(running):
            req.output_ids.append(1)
            req.kv_slots = torch.cat([req.kv_slots, allocator.alloc(1)])
            if rng.random() < 0.05:
                running.remove(req)
                allocator.free(req.kv_slots)
                pool.free(req)
        api.work_done()  # the device finished what was queued this iteration
        per_iteration.append(api.syncs - before)
        growth.append(allocator._segments.commits > commits)
    steady = [n for n, grew in zip(per_iteration, growth, strict=True) if not grew]
    grown = [n for n, grew in zip(per_iteration, growth, strict=True) if grew]
    assert len(steady) > 250 and sum(steady) == 0, per_iteration
    assert grown and all(n >= 1 for n in grown)  # a new segment: one wait per buffer mapped
    assert pool.committed_bytes() > G and pool._row_commits.releases > 0  # rows came and went
    for req in running:
        pool.free(req)
    running.clear()
    waiting.clear()
    scheduler.token_to_kv_pool_allocator = types.SimpleNamespace()  # rows only, here
    decide(modes.SEGMENTED, explicit_commits=True, kv_pool_problem="rows only, here")
    before = api.syncs
    for _ in range(2):  # idle iterations: the freed rows' fences pass, they go back
        scheduler_loop.before_get_next_batch_to_run(scheduler)
        api.work_done()
    assert pool.committed_bytes() == G  # row 0's granule only
    assert api.syncs == before


def test_the_padding_slot_reads_zeros_like_upstreams_pool(fake_gpu) -> None:
    """Padded cuda-graph batches read KV slot 0; upstream's pools are `torch.zeros`, and a
    GPU's freshly committed memory is not (the fake's is dirty)."""
    pool = kv_pools.SegmentedMHATokenToKVPool(8192, 16, torch.float32, 2, 64, 2, "cpu", False)
    kv_allocators.SegmentedPagedTokenToKVPoolAllocator(8192, 16, torch.float32, "cpu", pool, False)
    assert pool.segmented_buffers.committed_segments >= 1  # segment 0, by the allocator
    for buffer in (*pool.k_buffer, *pool.v_buffer):
        assert int(buffer[:16].count_nonzero()) == 0
        assert int(buffer[16:32].count_nonzero()) > 0  # the rest of the page: dirty, unread
