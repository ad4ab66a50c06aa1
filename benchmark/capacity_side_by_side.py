"""KV capacity of static and segmented side by side on the CPU engine, segmented over the CUDA
backing on the fake driver (explicit commits, 2 MiB granules): the tiny Llama at a 131,072
context with upstream's default request slots, no --max-total-tokens (issue 31, item 1).

    python benchmark/capacity_side_by_side.py [--out docs/runs/capacity_side_by_side.json]

Each server sizes its pool from the free memory it sees at start, so the two figures come
from two starts, one after the other, on the same machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import provenance  # benchmark/, the script's own folder

REPO = Path(__file__).resolve().parents[1]
CONTEXT = 131_072
LONG_CONTEXT_ENV = {"SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN": "1"}
FAKE_GPU_ENV = {
    "SGLANG_KVALLOC_TEST_VMM_API": "fake_cuda:server_api",
    "SGLANG_KVALLOC_FAKE_CUDA_GRANULARITY": str(2 << 20),
    "SGLANG_KVALLOC_FAKE_CUDA_CAPACITY": str(64 << 30),
    "PYTHONPATH": str(REPO / "test" / "support"),
}
FIGURES = ("mode", "token_capacity", "max_running_requests", "effective_context_length")


def main() -> None:
    from sglang_kvalloc_harness.serving import LocalServer
    from sglang_kvalloc_harness.tiny_model import ensure

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/sglang-kvalloc-tiny-f32"))
    args = parser.parse_args()
    model = ensure(args.model_dir, dtype="float32")
    out: dict = {"provenance": provenance.record("benchmark/capacity_side_by_side.py")}
    for mode, env in (("static", {}), ("segmented", FAKE_GPU_ENV)):
        flags = ["--kv-alloc-mode", mode, "--context-length", str(CONTEXT), "--dtype", "float32"]
        with LocalServer(model, args=flags, env={**LONG_CONTEXT_ENV, **env}) as server:
            kv = server.server_info()["internal_states"][0]["kv_alloc"]
        seg = kv.get("segments", {})
        out[mode] = {key: kv.get(key) for key in FIGURES}
        out[mode].update({key: seg.get(key) for key in ("row_room_bytes", "run_time_room_bytes")})
    out["segmented_share_of_static"] = round(
        out["segmented"]["token_capacity"] / out["static"]["token_capacity"], 4
    )
    text = json.dumps(out, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
