"""The CUDA VMM backing on a real GPU: address space, commit/release costs, data, the scratch
page, CUDA graphs across growth and shrink, rows and the fixed RoPE cache. Run with one command
(see test/gpu/run.sh); skipped without CUDA.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
from gpu_timing import GIB, MIB, free_bytes, timed
from sglang.srt.mem_cache.segmented.allocator import SegmentedPageAllocator
from sglang.srt.mem_cache.segmented.buffers import SegmentedBuffers
from sglang.srt.mem_cache.segmented.cuda_backing import CudaBackingFactory, CudaVmmBacking
from sglang.srt.mem_cache.segmented.geometry import SegmentGeometry
from sglang.srt.mem_cache.segmented.row_commits import RowCommits


def test_granularity_and_an_80_gb_reservation(vmm, results) -> None:
    api, device = vmm
    results["granularity_recommended_bytes"] = device.granularity
    results["granularity_minimum_bytes"] = device.min_granularity
    before = free_bytes()
    start = time.perf_counter()
    backing = CudaVmmBacking(80 * GIB, device)
    reserve_s = time.perf_counter() - start
    after = free_bytes()
    results["reserve_80gb_seconds"] = round(reserve_s, 3)
    results["reserve_80gb_free_memory_drop_bytes"] = before - after
    t = backing.tensor(torch.float32, (80 * GIB // 4,))
    probe = t[:: 64 * MIB // 4]  # one float per 64 MB, across the whole range
    assert int(probe.count_nonzero()) == 0  # every granule reads the scratch page
    assert before - after < 64 * MIB, "reserving address space must not take memory"
    del t, probe
    backing.close()


SIZES = [2 * MIB, 8 * MIB, 32 * MIB, 128 * MIB, 512 * MIB, GIB]


@pytest.mark.parametrize("size", SIZES, ids=[f"{s // MIB}MiB" for s in SIZES])
def test_commit_and_release_cost_per_segment_size(vmm, results, size: int) -> None:
    api, device = vmm
    backing = CudaVmmBacking(2 * size, device)
    cold, warm, release, drops = [], [], [], []
    for _ in range(5):
        before = free_bytes()
        cold.append(timed(lambda: backing.commit(0, size)))
        drops.append(before - free_bytes())
        release.append(timed(lambda: backing.release(0, size)))
        device.trim_spares()
    device.keep_spares(size, 1)
    for _ in range(5):
        device.refill()  # the refill thread's work, off the timed path
        warm.append(timed(lambda: backing.commit(0, size)))
        backing.release(0, size)
    device.trim_spares()
    backing.close()
    results[f"commit_{size // MIB}MiB"] = {
        "cold_commit_us_median": round(statistics.median(cold), 1),
        "commit_with_spare_handle_us_median": round(statistics.median(warm), 1),
        "release_us_median": round(statistics.median(release), 1),
        "free_memory_drop_bytes_median": int(statistics.median(drops)),
        "committed_bytes": size,
    }
    # Committed bytes are what the device's free memory loses (driver rounding aside).
    assert abs(statistics.median(drops) - size) <= 2 * device.granularity


def test_data_survives_other_ranges_and_uncommitted_reads_zero(vmm) -> None:
    api, device = vmm
    g = device.granularity
    backing = CudaVmmBacking(16 * g, device)
    t = backing.tensor(torch.int32, (16 * g // 4,))
    per = g // 4
    for seg in (0, 2, 5):
        backing.commit(seg * g, g)
        t[seg * per : (seg + 1) * per] = seg + 1
    backing.release(2 * g, g)
    backing.commit(7 * g, 2 * g)
    t[7 * per : 9 * per] = 8
    backing.release(7 * g, 2 * g)
    torch.cuda.synchronize()
    assert bool((t[:per] == 1).all()) and bool((t[5 * per : 6 * per] == 6).all())
    assert int(t[10 * per : 16 * per].count_nonzero()) == 0  # never committed: scratch zeros
    backing.close()


def test_cuda_graph_replays_across_growth_and_shrink(vmm, results) -> None:
    api, device = vmm
    g = device.granularity
    segment = 8 * g
    backing = CudaVmmBacking(8 * segment, device)
    t = backing.tensor(torch.float32, (8 * segment // 4,))
    backing.commit(0, segment)  # one segment committed at capture time
    per = segment // 4
    idx = torch.cat([torch.arange(s * per, s * per + 64, device="cuda") for s in range(8)])
    out = torch.zeros(idx.numel(), device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out.copy_(t[idx] * 2)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(t[idx] * 2)
    # Growth: seven more segments mapped under the captured address.
    for s in range(1, 8):
        backing.commit(s * segment, segment)
    t[idx] = torch.arange(idx.numel(), dtype=torch.float32, device="cuda")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, t[idx] * 2)
    # Shrink: the upper half released; replay still runs and reads zeros there.
    backing.release(4 * segment, 4 * segment)
    graph.replay()
    torch.cuda.synchronize()
    expected = t[idx] * 2
    assert torch.equal(out, expected)
    assert int(out[4 * 64 :].count_nonzero()) == 0
    # And grows again.
    backing.commit(4 * segment, 4 * segment)
    t[idx] = 3.0
    graph.replay()
    torch.cuda.synchronize()
    assert bool((out == 6.0).all())
    results["cuda_graph_replay_across_growth_and_shrink"] = "exact"
    del graph
    backing.close()


def test_segmented_allocator_with_free_lists_on_the_gpu(vmm) -> None:
    api, device = vmm
    g = device.granularity
    row = 4096
    tokens_per_segment = g // row
    geometry = SegmentGeometry(16 * tokens_per_segment, tokens_per_segment, 1)
    backings = [CudaVmmBacking(geometry.cap_tokens * row, device) for _ in range(2)]
    buffers = SegmentedBuffers(geometry, backings, [row, row])
    kv = [b.tensor(torch.int32, (geometry.cap_tokens, row // 4)) for b in backings]
    alloc = SegmentedPageAllocator(
        geometry,
        hold_off_s=0.0,
        on_commit=buffers.commit_segment,
        on_release=buffers.release_segment,
        lazy_merge=True,
        device="cuda",
    )
    live = []
    for i in range(40):
        x = alloc.alloc(3 * tokens_per_segment // 2)
        if x is None:
            alloc.free(live.pop(0))
            continue
        assert x.device.type == "cuda"
        kv[0][x] = i
        live.append(x)
        if i % 3 == 0:
            alloc.free(live.pop(0))
    for x in live:
        alloc.free(x)
    alloc.maybe_shrink()
    alloc.maybe_shrink()
    assert buffers.committed_segments == 1
    assert alloc.accounting_problems() == []


def test_rows_and_fixed_rope_cache_on_the_gpu(vmm) -> None:
    from sglang.srt.mem_cache.segmented.rope_cache import FixedAddressRope

    api, device = vmm
    row_bytes = 10_000_004 * 4  # a 10M-context req_to_token row
    backing = CudaVmmBacking(4 * row_bytes, device)
    table = backing.tensor(torch.int32, (4, 10_000_004))
    rows = RowCommits(backing, 4, row_bytes)
    rows.ensure(2, 4 * 1000)
    table[2, :1000] = 5
    rows.ensure(2, 4 * 3_000_000)
    table[2, 2_999_000:3_000_000] = 6
    torch.cuda.synchronize()
    assert int(table[2, :1000].sum()) == 5000
    rows.drop(2)
    rows.flush()
    assert backing.committed_bytes == 0

    class Rope(torch.nn.Module):  # upstream's RotaryEmbedding surface, as the cache uses it
        def __init__(self) -> None:
            super().__init__()
            self.base, self.position_start, self.rotary_dim = 10_000, 0, 128
            t = torch.arange(4096, dtype=torch.float, device="cuda")
            freqs = torch.einsum("i,j->ij", t, self._compute_inv_freq(self.base))
            self.register_buffer("cos_sin_cache", torch.cat((freqs.cos(), freqs.sin()), -1))

        def _compute_inv_freq(self, base: float) -> torch.Tensor:
            arange = torch.arange(0, self.rotary_dim, 2, dtype=torch.float, device="cuda")
            return 1.0 / (base ** (arange / self.rotary_dim))

    module = Rope()
    fixed = FixedAddressRope(module, 10_000_000, torch.bfloat16, CudaBackingFactory(device))
    address = module.cos_sin_cache.data_ptr()
    fixed.grow(2_000_000)
    t = torch.arange(2_000_000, dtype=torch.float, device="cuda")
    freqs = torch.einsum("i,j->ij", t, module._compute_inv_freq(10_000))
    expected = torch.cat((freqs.cos(), freqs.sin()), -1).to(torch.bfloat16)
    assert torch.equal(module.cos_sin_cache[4096:2_000_000], expected[4096:])
    assert module.cos_sin_cache.data_ptr() == address
    assert fixed.committed_bytes < 10_000_000 * 128 * 2 // 2
