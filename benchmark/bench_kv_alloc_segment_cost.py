"""Part 3 of bench_kv_alloc.py: the cost of committing and releasing one segment, timed in
process with the core classes and no server running (so nothing else shares the cores).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any


def segment_cost(
    name: str,
    geometry_args: dict[str, Any],
    row_bytes: list[int],
    granularity: int | None,
    reps: int,
) -> dict[str, Any]:
    """Commit and release one segment of a CPU-backed SegmentedBuffers `reps` times, cycling
    over segments 1.. (segment 0 is left alone): every timing, medians, 90th percentiles."""
    from sglang.srt.mem_cache.segmented.buffers import SegmentedBuffers
    from sglang.srt.mem_cache.segmented.cpu_backing import CpuBackingFactory
    from sglang.srt.mem_cache.segmented.geometry import SegmentGeometry

    geometry = SegmentGeometry(**geometry_args)
    bufs = SegmentedBuffers.create(geometry, row_bytes, CpuBackingFactory(granularity))
    seg_bytes = sum(rb * geometry.segment_tokens for rb in row_bytes)
    commit_s: list[float] = []
    release_s: list[float] = []
    try:
        for i in range(reps):
            seg = 1 + i % (geometry.num_segments - 1)
            t0 = time.perf_counter()
            bufs.commit_segment(seg)
            t1 = time.perf_counter()
            bufs.release_segment(seg)
            t2 = time.perf_counter()
            commit_s.append(t1 - t0)
            release_s.append(t2 - t1)
        populate = getattr(bufs.backings[0], "uses_populate_write", None)
    finally:
        bufs.close()
    c = statistics.median(commit_s)
    return {
        "name": name,
        "buffers": len(row_bytes),
        "row_bytes": sorted(set(row_bytes)),
        "segment_tokens": geometry.segment_tokens,
        "segment_bytes_total": seg_bytes,
        "bytes_per_buffer": seg_bytes // len(row_bytes),
        "granularity": granularity,
        "repetitions": reps,
        "commit_median_s": c,
        "release_median_s": statistics.median(release_s),
        "commit_p90_s": sorted(commit_s)[int(0.9 * (reps - 1))],
        "release_p90_s": sorted(release_s)[int(0.9 * (reps - 1))],
        "commit_gb_per_s": seg_bytes / c / 1e9,
        "uses_madv_populate_write": populate,
        "commit_s": commit_s,
        "release_s": release_s,
    }


def segment_costs(model: Path, seg_info: dict[str, Any] | None, reps: int) -> list[dict[str, Any]]:
    """The cost for the tiny model's pool, with the geometry the server used (`seg_info`, else
    a default), and for a GPU-like shape of buffers."""
    cfg = json.loads((model / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_row = cfg["num_key_value_heads"] * head_dim * 4  # float32 K (and V) bytes per token
    layers = cfg["num_hidden_layers"]
    seg_tokens = (seg_info or {}).get("segment_tokens", 4096)
    num_segments = (seg_info or {}).get("total_segments", 17)
    out = [
        segment_cost(
            f"tiny model pool ({2 * layers} buffers x {seg_tokens * kv_row // 1024} KB)",
            {"cap_tokens": seg_tokens * num_segments, "segment_tokens": seg_tokens, "page_size": 1},
            [kv_row] * (2 * layers),
            None,
            reps,
        )
    ]
    # GPU-like: 64 buffers (K and V of 32 layers), 2 MB each per segment, 2 MB granularity.
    gpu_tokens = 4096
    out.append(
        segment_cost(
            "GPU-like (64 buffers x 2 MB)",
            {"cap_tokens": gpu_tokens * 8, "segment_tokens": gpu_tokens, "page_size": 1},
            [2 * 1024 * 1024 // gpu_tokens] * 64,
            2 * 1024 * 1024,
            max(10, reps // 2),
        )
    )
    return out
