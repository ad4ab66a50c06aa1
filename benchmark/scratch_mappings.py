"""How many scratch mappings a rank makes at start, and how long they take through the fake
CUDA driver, at a planner geometry (default: Llama-3.1-8B, 8x H200, 8M context, fa3).

Every reserved granule of segmented mode reads a zero-filled scratch handle until it is
committed. Mapped one granule at a time that is one `cuMemMap` per 2 MiB reserved: about
104K a rank here, where the most a GPU run has made is 40,960 (docs/gpu-runs, run 11).
Large reservations now map a scratch chunk of `SCRATCH_CHUNK_GRANULES` granules at once.

    python benchmark/scratch_mappings.py [--model llama-3.1-8b --gpu h200 --tp 8
                                          --context 8000000] [--out docs/runs/...json]

The counts are arithmetic on the planner's reservations and, for the chunked mapping, the
fake driver's own call count; the times are the fake's (host mmap calls), not a GPU's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import provenance  # benchmark/, the script's own folder

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "test" / "support"))

from fake_cuda import MIB, FakeDriver, FakeVmmApi  # noqa: E402
from sglang.srt.mem_cache.segmented.cuda_backing import CudaVmmBacking, VmmDevice  # noqa: E402
from sglang.srt.mem_cache.segmented.vmm_device import (  # noqa: E402
    CHUNKED_RESERVATION_MIN_CHUNKS,
    SCRATCH_CHUNK_GRANULES,
)

from sglang_kvalloc.core.planner import (  # noqa: E402
    GPU_PRESETS_MIB,
    PlanInputs,
    load_model_config,
    model_spec_from_config,
    plan,
)

GRANULE = 2 * MIB  # the recommended granularity on H100 (docs/gpu-runs)


def reservations(model: str, gpu: str, tp: int, context: int) -> dict[str, list[int]]:
    """The byte sizes a rank reserves in segmented mode: one backing per KV buffer (K and V
    of every layer), req_to_token, the lazy cuda-graph buffers and the RoPE cache."""
    result = plan(
        PlanInputs(
            model=model, device_memory_bytes=GPU_PRESETS_MIB[gpu] * MIB, tp=tp,
            context_length=context, allow_longer_context=True,
        )
    )  # fmt: skip
    cell = result.kv_per_token
    rows = result.max_total_num_tokens + 1  # upstream's buffers: size + one padding page
    kv = [rows * (cell.per_layer_full // 2)] * (2 * cell.full_layers)
    table = [a.bytes for a in result.segmented.allocations if a.name == "req_to_token"]
    graphs = [a.bytes for a in result.segmented.allocations if a.lazy is not None]
    spec = model_spec_from_config(load_model_config(model))
    rope = [context * spec.head_dim * 4]  # float32 cos and sin halves, one position a row
    return {"kv_buffers": kv, "req_to_token": table, "graph_buffers": graphs, "rope": rope}


def mappings(sizes: list[int], chunk_granules: int) -> int:
    """Scratch mappings at start for these reservations, chunked as `_Reservation` does."""
    chunk = chunk_granules * GRANULE
    total = 0
    for size in sizes:
        size = -(-size // GRANULE) * GRANULE
        if chunk_granules > 1 and size >= CHUNKED_RESERVATION_MIN_CHUNKS * chunk:
            total += size // chunk + (size % chunk) // GRANULE
        else:
            total += size // GRANULE
    return total


def measure(sizes: list[int]) -> dict[str, float | int]:
    """Reserve them all over the fake driver (chunked): its cuMemMap count and the time."""
    driver = FakeDriver(capacity=64 * MIB, min_granularity=GRANULE)
    device = VmmDevice(FakeVmmApi(driver), 0, background_refill=False)
    device.scratch_chunk()  # made once per device, not per reservation
    before = driver.calls.get("cuMemMap", 0)
    start = time.perf_counter()
    backings = [CudaVmmBacking(size, device) for size in sizes]
    seconds = time.perf_counter() - start
    maps = driver.calls["cuMemMap"] - before
    for backing in backings:
        backing.close()
    return {"cuMemMap_calls": maps, "seconds": round(seconds, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--gpu", default="h200", choices=sorted(GPU_PRESETS_MIB))
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--context", type=int, default=8_000_000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    groups = reservations(args.model, args.gpu, args.tp, args.context)
    sizes = [size for group in groups.values() for size in group]
    out = {
        "provenance": provenance.record("benchmark/scratch_mappings.py"),
        "geometry": {"model": args.model, "gpu": args.gpu, "tp": args.tp, "context": args.context},
        "reserved_bytes": {name: sum(group) for name, group in groups.items()},
        "granule_bytes": GRANULE,
        "scratch_chunk_granules": SCRATCH_CHUNK_GRANULES,
        "mappings_one_per_granule": mappings(sizes, 1),
        "mappings_chunked": mappings(sizes, SCRATCH_CHUNK_GRANULES),
        "fake_driver_chunked": measure(sizes),
        "most_mappings_run_on_a_gpu": 40_960,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
