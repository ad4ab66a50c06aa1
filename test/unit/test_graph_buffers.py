"""Lazy cuda-graph buffers (issue 9) over the fake CUDA driver: what a batch commits equals the
layout's arithmetic (the planner's), data written inside the committed part survives growth,
a failed commit changes nothing, and idle gives everything back."""

from __future__ import annotations

import pytest
import torch
from fake_cuda import MIB, FakeDriver, FakeVmmApi
from sglang.srt.mem_cache.segmented.cuda_backing import CudaVmmBacking, VmmDevice
from sglang.srt.mem_cache.segmented.graph_buffers import LazyGraphBuffer
from sglang.srt.mem_cache.segmented.graph_layouts import (
    CHUNK_ROWS,
    FLAT,
    ROWS,
    GraphBatch,
    GraphBufferLayout,
)

G = 2 * MIB


class Device:
    """The fake driver, and what it holds beyond the device's one scratch granule."""

    def __init__(self, capacity: int) -> None:
        self.driver = FakeDriver(capacity=capacity)
        self.vmm = VmmDevice(FakeVmmApi(self.driver), 0, background_refill=False)

    @property
    def physical_bytes(self) -> int:
        return self.driver.physical_bytes - self.vmm.scratch_bytes

    def fail_next(self, name: str, times: int = 1) -> None:
        self.driver.fail_next(name, times=times)


def lazy(layout: GraphBufferLayout, capacity: int = 256 * MIB) -> tuple[LazyGraphBuffer, Device]:
    device = Device(capacity)
    return LazyGraphBuffer(layout, CudaVmmBacking(layout.reserved_bytes, device.vmm)), device


def test_flat_commits_the_batch_prefix_and_grows_in_whole_mappings() -> None:
    layout = GraphBufferLayout("kv_indices", FLAT, 1, 64 * 10_000_000, 8)  # 5.1 GB reserved
    buffer, driver = lazy(layout)
    view = buffer.backing.tensor(torch.int64, (layout.items,))
    capture = GraphBatch(rows=64, seq_lens_sum=64, max_seq_len=1)
    assert buffer.ensure(capture) == G == layout.commit_bytes(capture, G)
    view[:64] = 5
    big = GraphBatch(rows=64, seq_lens_sum=3_000_000, max_seq_len=100_000)
    grown = buffer.ensure(big)
    expected = layout.commit_bytes(big, G)
    assert buffer.committed_bytes == expected == -(-(3_000_000 + 128) * 8 // G) * G
    assert grown == expected - G
    assert driver.physical_bytes == expected  # what the device lost is what was committed
    view[3_000_000 - 1] = 7  # the last item this batch writes is backed
    assert int(view[:64].sum()) == 320  # growth kept what the first mapping held
    assert buffer.ensure(GraphBatch(64, 1000, 10)) == 0  # smaller batches commit nothing
    assert buffer.release() == expected and driver.physical_bytes == 0


def test_rows_commit_each_row_prefix_with_shared_granules_counted_once() -> None:
    layout = GraphBufferLayout("page_table", ROWS, 512, 10_000_000 // 16, 4, positions_per_item=16)
    buffer, driver = lazy(layout, capacity=2048 * MIB)
    for batch in [GraphBatch(512, 512, 1), GraphBatch(100, 100 * 50_000, 3_000_000)]:
        buffer.release()
        buffer.ensure(batch)
        assert buffer.committed_bytes == layout.commit_bytes(batch, G) == driver.physical_bytes
    # 2.5 MB rows, prefixes of ceil((3M + 1) / 16) + 1 pages x 4 B = 750 KB: 100 rows touch
    # 1 or 2 granules each, neighbours never share one here.
    assert layout.commit_bytes(GraphBatch(100, 1, 3_000_000), G) == buffer.committed_bytes
    table = buffer.backing.tensor(torch.int32, (512, layout.items))
    table[99, : layout.items_needed(GraphBatch(100, 1, 3_000_000))] = 3  # backed: no fault
    # Rows of 1 MB: two neighbours share each granule, counted once (256 granules, not 512).
    narrow = GraphBufferLayout("page_table", ROWS, 512, MIB // 4, 4)
    buffer, device = lazy(narrow, capacity=1024 * MIB)
    buffer.ensure(GraphBatch(512, 512, 1))
    assert narrow.commit_bytes(GraphBatch(512, 512, 1), G) == 256 * G == device.physical_bytes


def test_rows_fast_path_keeps_what_every_row_holds() -> None:
    layout = GraphBufferLayout("page_table", ROWS, 8, 4 * MIB, 4)  # 16 MiB rows
    buffer, _ = lazy(layout)
    buffer.ensure(GraphBatch(8, 8, 1))
    assert buffer.committed_bytes == 8 * G
    # Fewer rows, longer: rows 0-1 grow, the fast path must not believe rows 2-7 did.
    buffer.ensure(GraphBatch(2, 2, 600_000))
    assert buffer.committed_bytes == 8 * G + 2 * G
    buffer.ensure(GraphBatch(8, 8, 600_000))
    assert buffer.committed_bytes == 8 * 2 * G
    assert buffer.ensure(GraphBatch(8, 8, 500_000)) == 0


def test_a_failed_commit_changes_nothing_and_the_next_one_succeeds() -> None:
    layout = GraphBufferLayout("kv_indices", FLAT, 1, 50_000_000, 8)
    buffer, driver = lazy(layout)
    buffer.ensure(GraphBatch(8, 8, 1))
    before = buffer.committed_bytes
    driver.fail_next("cuMemCreate", times=2)  # once more after the reclaim
    with pytest.raises(MemoryError):
        buffer.ensure(GraphBatch(8, 1_000_000, 500_000))
    assert buffer.committed_bytes == before == driver.physical_bytes
    buffer.ensure(GraphBatch(8, 1_000_000, 500_000))
    assert buffer.committed_bytes == layout.commit_bytes(GraphBatch(8, 1_000_000, 500_000), G)


def test_chunk_rows_commit_whole_rows_per_chunk_the_query_tokens_reach() -> None:
    """Llama-4's local-attention table: a row per (request, chunk holding its query tokens),
    whatever the sequence lengths; q tokens span up to 1 + ceil((q - 1) / chunk) chunks."""
    chunk = 8192
    layout = GraphBufferLayout("local_block_table", CHUNK_ROWS, 64 * 1222, chunk, 4,
                               chunk_positions=chunk)  # fmt: skip
    decode = GraphBatch(16, 16 * 9_000_000, 9_000_000)
    assert layout.rows_written(decode) == 17 and layout.items_needed(decode) == chunk
    assert layout.rows_written(GraphBatch(16, 16, 1, tokens_per_row=chunk + 2)) == 16 * 3 + 1
    buffer, device = lazy(layout, capacity=64 * MIB)
    assert buffer.ensure(decode) == layout.commit_bytes(decode, G) == G  # 17 x 32 KiB rows
    # A batch of 200 rows reaches past the first granule (64 rows of 32 KiB each).
    wide = GraphBatch(200, 200, 1)
    assert buffer.ensure(wide) == layout.commit_bytes(wide, G) - G == 3 * G
    assert device.physical_bytes == buffer.committed_bytes == 4 * G
    assert buffer.release() == 4 * G and device.physical_bytes == 0


def test_rows_per_query_token_commit_a_row_per_draft_token() -> None:
    """fa3's top-k sliding-window verify table: one row per draft token of each request, each
    written up to its request's length plus the draft positions."""
    draft = 8
    layout = GraphBufferLayout("fa3 swa-spec page table", ROWS, 16 * draft, 1_000_008, 4,
                               per_query_token=True)  # fmt: skip
    batch = GraphBatch(4, 4 * 300_000, 300_000, tokens_per_row=draft)
    assert layout.rows_written(batch) == 32
    assert layout.items_needed(batch) == 300_000 + draft + 1
    buffer, device = lazy(layout, capacity=512 * MIB)
    assert buffer.ensure(batch) == layout.commit_bytes(batch, G) == device.physical_bytes
    assert buffer.release() == layout.commit_bytes(batch, G)


def test_layouts_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="attention chunk"):
        GraphBufferLayout("x", CHUNK_ROWS, 1, 1, 4)
    with pytest.raises(ValueError, match="attention chunk"):
        GraphBufferLayout("x", ROWS, 1, 1, 4, chunk_positions=8192)
    with pytest.raises(ValueError, match="kind"):
        GraphBufferLayout("x", "ragged", 1, 1, 1)
    with pytest.raises(ValueError, match="positive"):
        GraphBufferLayout("x", FLAT, 1, 0, 8)
    layout = GraphBufferLayout("x", FLAT, 1, 100, 8)
    assert layout.items_needed(GraphBatch(8, 10**9, 10**8)) == 100  # never past the buffer
    assert layout.commit_bytes(GraphBatch(0, 0, 0), G) == 0


@pytest.mark.parametrize(
    "layout",
    [
        GraphBufferLayout("fa3 page_table", ROWS, 512, 10_000_000, 4),
        GraphBufferLayout("kv_indices", FLAT, 1, 64 * 1_000_000, 8),
    ],
    ids=["rows", "flat"],
)
def test_serving_commits_wait_for_no_device(layout: GraphBufferLayout) -> None:
    """Capture (512 rows of a 10M-context page table: 512 granules) and every replay after
    an idle release commit where no replay in flight writes or reads: no device wait on the
    scheduler's path (each used to wait, one per granule); the idle release waits once."""
    buffer, device = lazy(layout, capacity=2048 * MIB)
    api = device.vmm.api
    start = api.syncs  # the scratch granule was zeroed
    rows = layout.rows
    buffer.ensure(GraphBatch(rows, rows, 1))  # capture
    assert buffer.committed_bytes >= (rows * G if rows > 1 else G)
    assert api.syncs == start
    for length in (1000, 200_000, 600_000):  # replays that grow
        buffer.ensure(GraphBatch(8, 8 * length, length))
    assert api.syncs == start
    assert buffer.release() > 0 and api.syncs == start + 1  # idle: nothing is running
    buffer.ensure(GraphBatch(8, 8 * 600_000, 600_000))
    assert api.syncs == start + 1
