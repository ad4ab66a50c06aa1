"""Segment geometry and SegmentedBuffers: segments of whole granules, committed and released by
segment."""

from __future__ import annotations

import pytest
import torch
from segment_helpers import MB, PAGE
from sglang.srt.mem_cache.segmented.buffers import SegmentedBuffers
from sglang.srt.mem_cache.segmented.cpu_backing import CpuBackingFactory, CpuMmapBacking
from sglang.srt.mem_cache.segmented.geometry import SegmentGeometry, aligned_segment_tokens

# -- geometry ------------------------------------------------------------------------------


def test_geometry_exact_and_partial() -> None:
    g = SegmentGeometry(256, 64, 1)
    assert (g.num_segments, g.cap_pages, g.segment_pages) == (4, 256, 64)
    assert g.segment_pages_range(3) == (192, 256)
    g = SegmentGeometry(250, 64, 1)
    assert g.num_segments == 4
    assert g.segment_pages_range(3) == (192, 250)
    assert g.segment_rows(3) == (192, 250)
    g = SegmentGeometry(1024, 256, 16)
    assert (g.num_segments, g.cap_pages, g.segment_pages) == (4, 64, 16)
    assert g.segment_rows(1) == (256, 512)
    assert g.segment_of_page(17) == 1
    with pytest.raises(IndexError):
        g.segment_pages_range(4)
    assert SegmentGeometry(64, 64, 16).num_segments == 1


@pytest.mark.parametrize(
    ("cap", "seg", "ps", "match"),
    [
        (256, 0, 1, "segment size must be positive, got 0"),
        (256, -16, 16, "segment size must be positive, got -16"),
        (256, 24, 16, "segment size of 24 tokens is not a multiple of page_size 16"),
        (256, 512, 1, "segment size of 512 tokens is larger than the KV cap of 256"),
        (250, 32, 16, "KV cap of 250 tokens is not a multiple of page_size 16"),
        (0, 16, 16, "KV cap must be positive, got 0"),
        (256, 16, 0, "page_size must be positive, got 0"),
    ],
)
def test_geometry_errors(cap: int, seg: int, ps: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SegmentGeometry(cap, seg, ps)


def test_aligned_segment_tokens() -> None:
    assert aligned_segment_tokens(64, 1, [64], 4096) == 64
    assert aligned_segment_tokens(10, 1, [64], 4096) == 64
    assert aligned_segment_tokens(65, 1, [64], 4096) == 128
    # gcd(96, 4096) = 32 -> 128-token steps, already a multiple of page_size 16.
    assert aligned_segment_tokens(100, 16, [96], 4096) == 128
    # Two buffers: 1024-byte rows need 2048-token steps for 2 MB granules.
    assert aligned_segment_tokens(1, 1, [2048, 1024], 2 * MB) == 2048
    # page_size larger than the byte step dominates.
    assert aligned_segment_tokens(1, 64, [4096], 4096) == 64
    for requested in range(1, 300, 7):
        for row_bytes in ([64], [96, 40], [4096, 24]):
            got = aligned_segment_tokens(requested, 16, row_bytes, 4096)
            assert got >= requested and got % 16 == 0
            assert all(got * rb % 4096 == 0 for rb in row_bytes)
            assert not any(  # smallest such
                all(t * rb % 4096 == 0 for rb in row_bytes)
                for t in range(16 * -(-requested // 16), got, 16)
            )
    with pytest.raises(ValueError, match="positive"):
        aligned_segment_tokens(0, 1, [64], 4096)
    with pytest.raises(ValueError, match="row size"):
        aligned_segment_tokens(10, 1, [0], 4096)


# -- buffers -------------------------------------------------------------------------------


def test_buffers_commit_release_by_segment() -> None:
    g = SegmentGeometry(256, 64, 1)
    buf = SegmentedBuffers.create(g, [64, 128], CpuBackingFactory())
    # Segment 0 (padding slot) is committed at construction.
    assert buf.committed_segments == 1 and buf.is_committed(0)
    assert buf.committed_bytes == 64 * 64 + 64 * 128
    assert buf.byte_range(1, 2) == (128 * 128, 64 * 128)
    buf.commit_segment(2)
    buf.commit_segment(2)
    assert buf.committed_segments == 2
    assert buf.committed_bytes == 2 * (64 * 64 + 64 * 128)
    k = buf.backings[0].tensor(torch.int32, (256, 16))
    k[128:192] = 9
    k[0:64] = 4
    buf.release_segment(2)
    buf.release_segment(2)
    assert buf.committed_segments == 1
    assert int(k[128:192].count_nonzero()) == 0
    assert bool((k[0:64] == 4).all())
    with pytest.raises(ValueError, match="padding"):
        buf.release_segment(0)
    del k
    buf.close()


def test_buffers_reject_misaligned_segment_and_small_backing() -> None:
    g = SegmentGeometry(256, 32, 1)
    with pytest.raises(ValueError, match="aligned_segment_tokens"):
        SegmentedBuffers.create(g, [64], CpuBackingFactory())
    g = SegmentGeometry(256, 64, 1)
    with pytest.raises(ValueError, match="reserves"):
        SegmentedBuffers(g, [CpuMmapBacking(PAGE)], [64])
    with pytest.raises(ValueError, match="row sizes"):
        SegmentedBuffers(g, [CpuMmapBacking(16 * PAGE)], [64, 64])


def test_buffers_partial_last_segment_and_extra_rows() -> None:
    # 200 rows x 64 B: last segment holds rows 192..200, i.e. bytes 12288..12800.
    g = SegmentGeometry(200, 64, 1)
    buf = SegmentedBuffers.create(g, [64], CpuBackingFactory())
    assert buf.byte_range(0, 3) == (12288, PAGE)  # rounded up to a whole granule
    buf.commit_segment(3)
    assert buf.committed_bytes == 2 * PAGE
    buf.close()

    # With 8 extra rows (bytes 12800..13312) the shared granule is pinned with them.
    buf = SegmentedBuffers.create(g, [64], CpuBackingFactory(), extra_rows=8)
    assert buf.rows == 208
    assert buf.committed_bytes == 2 * PAGE  # segment 0 + pinned tail granule
    t = buf.backings[0].tensor(torch.int32, (208, 16))
    t[196:208] = 3
    buf.commit_segment(3)
    buf.release_segment(3)
    assert bool((t[196:208] == 3).all())
    assert buf.committed_bytes == 2 * PAGE
    del t
    buf.close()
