"""RL's release and resume of memory occupation in segmented mode (issue 35), below the
endpoints: the allocator's suspend and resume over the CPU backing (resident memory measured
with mincore), and the whole GPU-side sequence over the CUDA backing on the fake driver (KV
segments, req_to_token rows, a captured cuda-graph buffer, the fixed RoPE cache and the
spare handles all given back; a replay and the RoPE values right after resume)."""

from __future__ import annotations

import ctypes
import mmap
import types

import numpy as np
import pytest
import torch
from decisions import decide
from fake_cuda import MIB, FakeDriver, FakeVmmApi
from sglang.srt.mem_cache.segmented import lazy_req_to_token, memory_release, modes, scheduler_loop
from sglang.srt.mem_cache.segmented.allocator import SegmentedPageAllocator
from sglang.srt.mem_cache.segmented.buffers import SegmentedBuffers
from sglang.srt.mem_cache.segmented.cpu_backing import CpuBackingFactory
from sglang.srt.mem_cache.segmented.cuda_backing import CudaBackingFactory, VmmDevice
from sglang.srt.mem_cache.segmented.geometry import SegmentGeometry
from sglang.srt.mem_cache.segmented.graph_buffers import LazyGraphBuffer
from sglang.srt.mem_cache.segmented.graph_layouts import ROWS, GraphBatch, GraphBufferLayout
from sglang.srt.mem_cache.segmented.runtime import RUNTIME

from sglang_kvalloc.upstream import plugin

G = 2 * MIB


def _resident(tensor: torch.Tensor) -> int:
    """Bytes of a host tensor's range resident in memory (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    nbytes = tensor.numel() * tensor.element_size()
    vec = (ctypes.c_ubyte * (-(-nbytes // page)))()
    assert libc.mincore(ctypes.c_void_p(tensor.data_ptr()), ctypes.c_size_t(nbytes), vec) == 0
    return int((np.frombuffer(vec, dtype=np.uint8) & 1).sum()) * page


def test_suspend_gives_back_every_segment_and_resume_commits_on_demand() -> None:
    geometry = SegmentGeometry(4096, 1024, 1)
    buffers = SegmentedBuffers.create(geometry, [4096, 4096], CpuBackingFactory())
    k = buffers.backings[0].tensor(torch.uint8, (4096 * 4096,))
    allocator = SegmentedPageAllocator(
        geometry, on_commit=buffers.commit_segment, on_release=buffers.release_segment,
        on_suspend=buffers.release_all, debug=True,
    )  # fmt: skip
    pages = allocator.alloc(2500)
    assert pages is not None and buffers.committed_segments == 3
    k[4096 : 2501 * 4096] = 7  # the pages written, as a prefill would
    allocator.free(pages)
    assert _resident(k) >= 3 * 1024 * 4096
    assert allocator.suspend() == 3
    assert buffers.committed_segments == 0 and _resident(k) == 0  # the first segment too
    assert allocator.available_pages() == 0 and allocator.alloc(1) is None  # requests queue
    assert allocator.withheld_pages() == allocator.capacity_pages  # upstream's leak check holds
    assert not allocator.prepare(100)  # no commit while suspended
    allocator.check_invariants()
    allocator.resume()
    assert buffers.committed_segments == 0  # nothing until asked
    allocator.check_invariants()
    assert allocator.alloc(10) is not None and buffers.committed_segments == 1
    assert int(k[:4096].count_nonzero()) == 0  # the padding page reads zeros
    allocator.check_invariants()


def test_suspend_refuses_while_pages_are_in_use() -> None:
    geometry = SegmentGeometry(2048, 1024, 1)
    buffers = SegmentedBuffers.create(geometry, [64], CpuBackingFactory())
    allocator = SegmentedPageAllocator(geometry, on_commit=buffers.commit_segment,
                                       on_suspend=buffers.release_all)  # fmt: skip
    assert allocator.alloc(5) is not None
    with pytest.raises(Exception, match="in use"):
        allocator.suspend()
    assert buffers.committed_segments == 1


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> FakeDriver:
    driver = FakeDriver(capacity=1024 * MIB, min_granularity=G, dirty_new_memory=True)
    factory = CudaBackingFactory(VmmDevice(FakeVmmApi(driver), 0, background_refill=False))
    monkeypatch.setattr(RUNTIME, "backings", factory)
    decide(modes.SEGMENTED, explicit_commits=True)
    monkeypatch.setattr(scheduler_loop, "decode_slots", lambda: (1, 2))
    return driver


class _Allocator:
    """The segmented allocator's RL verbs over real segments on the fake device."""

    def __init__(self) -> None:
        geometry = SegmentGeometry(8192, 2048, 1)
        factory = RUNTIME.backings
        self.buffers = SegmentedBuffers.create(geometry, [1024, 1024], backings=factory)
        self.segments = SegmentedPageAllocator(
            geometry, on_commit=self.buffers.commit_segment,
            on_release=self.buffers.release_segment, on_suspend=self.buffers.release_all,
        )  # fmt: skip

    def note_busy(self) -> None:
        pass

    def scheduler_step(self, demand_tokens: int) -> None:
        pass

    def suspend(self) -> int:
        return self.segments.suspend()

    def resume(self) -> None:
        self.segments.resume()

    def segment_stats(self) -> dict[str, int]:
        return {"committed_bytes": self.buffers.committed_bytes}


def test_the_whole_gpu_side_goes_back_and_comes_back(fake_gpu: FakeDriver) -> None:
    from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding
    from sglang.srt.mem_cache.segmented.rope_cache import FixedAddressRope

    device = RUNTIME.backings.device
    allocator = _Allocator()
    pages = allocator.segments.alloc(5000)  # two more segments
    pool = lazy_req_to_token.SegmentedReqToTokenPool(8, 2_000_000, "cpu", False)
    kv = types.SimpleNamespace(req_pool_idx=None, holds_kv=False)
    req = types.SimpleNamespace(origin_input_ids=[0] * 700_000, output_ids=[], extend_end=0, kv=kv)
    (row,) = pool.alloc([req])
    layout = GraphBufferLayout("fa3 page table", ROWS, 16, 2_000_000, 4)
    graph = LazyGraphBuffer(layout, RUNTIME.backings(layout.reserved_bytes))
    RUNTIME.graph.buffers.append(graph)
    graph.ensure(GraphBatch(16, 16, 1))  # captured: every row's first granule committed
    module = RotaryEmbedding(64, 64, 4096, 10_000, True, torch.float32)
    rope = FixedAddressRope(module, 1_000_000, torch.float32, RUNTIME.backings)
    rope.grow(300_000)
    RUNTIME.rope.add(rope)
    cache_before = rope.view[:300_000].clone()
    device.ready_handles(G, 6)  # spares held
    # The engine is idle: the requests finished, the cache flushed.
    allocator.segments.free(pages)
    pool.free_rows([row])
    scheduler = types.SimpleNamespace(token_to_kv_pool_allocator=allocator, req_to_token_pool=pool)
    held = fake_gpu.physical_bytes
    given_back = memory_release.release(scheduler)
    assert fake_gpu.physical_bytes == device.scratch_bytes  # only the scratch handles remain
    assert given_back == held - device.scratch_bytes
    assert RUNTIME.state.kv_released and allocator.segments.alloc(1) is None
    memory_release.resume(scheduler)
    assert fake_gpu.physical_bytes == device.scratch_bytes  # resume commits nothing
    # The first iteration with work: the padding row and the RoPE cache come back first.
    waiting = [types.SimpleNamespace(origin_input_ids=[0] * 100, output_ids=[], prefix_len=0)]
    loop = types.SimpleNamespace(
        token_to_kv_pool_allocator=allocator, req_to_token_pool=pool, waiting_queue=waiting,
        chunked_req=None, running_batch=None, page_size=1, chunked_prefill_size=-1,
    )  # fmt: skip
    scheduler_loop.before_get_next_batch_to_run(loop)
    assert not RUNTIME.state.restore_pending
    assert torch.equal(rope.view[:300_000], cache_before)  # upstream's rows and the formula's
    assert int(pool.req_to_token[0, : G // 4].count_nonzero()) == 0  # the padding row: zeros
    assert graph.ensure(GraphBatch(4, 400, 100)) > 0  # a replay after resume commits again
    assert allocator.segments.alloc(100) is not None
    assert int(allocator.buffers.backings[0].tensor(torch.uint8, (1024,)).count_nonzero()) == 0


def test_the_product_leaves_upstreams_release_alone_and_the_cpu_engine_fix_is_the_harness(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The product's hooks run after upstream's release (its result passed through, nothing
    done in static mode) and never touch ``torch.get_device_module``; on the CPU engine the
    harness's hook gives upstream's call SGLang's device module and puts torch's back."""
    from sglang.srt.utils.common import get_device_module

    from sglang_kvalloc_harness import cpu_engine_rl

    decide(modes.STATIC)
    bare = torch.get_device_module
    seen: list[object] = []

    def upstream_release(updater: object, recv_req: object) -> str:
        seen.append(torch.get_device_module())
        return "released"

    request = types.SimpleNamespace(tags=["kv_cache"])
    scheduler = types.SimpleNamespace(token_to_kv_pool_allocator=None, req_to_token_pool=None)
    updater = types.SimpleNamespace(scheduler=scheduler)
    product = plugin.around_release_memory_occupation
    assert product(upstream_release, updater, request) == "released"
    assert seen == [bare()] and not RUNTIME.state.kv_released
    monkeypatch.setattr(cpu_engine_rl, "cpu_engine", lambda: True)
    assert cpu_engine_rl.around_memory_occupation(upstream_release, updater, request) == "released"
    assert seen[-1] is get_device_module() and torch.get_device_module is bare
    monkeypatch.setattr(cpu_engine_rl, "cpu_engine", lambda: False)
    cpu_engine_rl.around_memory_occupation(upstream_release, updater, request)
    assert seen[-1] == bare()  # CUDA untouched
