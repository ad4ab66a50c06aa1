"""A PD decode server's memory, static at 4K context and segmented at 10M side by side on the
CPU engine (issue 36): resident memory at start and under load, and what each one's
`req_to_token` reserves and holds, and what each one's KV pool holds (static: built whole;
segmented: committed a segment at a time). Upstream's decode loop, its fake transfer backend (no
prefill peer: upstream synthesises each request's first token), the tiny Llama.

    python benchmark/pd_decode_memory.py [--bursts 4] [--out docs/runs/pd_decode_memory.json]

Each burst sends 4 requests at once (150 to 2,400 prompt tokens, 32 new tokens each) to each
server in turn, the other paused (an idle CPU-engine scheduler busy-polls a core).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import provenance  # benchmark/, the script's own folder

DECODE = ["--disaggregation-mode", "decode", "--disaggregation-transfer-backend", "fake"]
DECODE += ["--disaggregation-decode-retraction-backup", "cpu_tensor"]
DECODE += ["--max-total-tokens", "65536", "--dtype", "float32"]
CONTEXTS = {"static_4k": ("static", 4096), "segmented_10m": ("segmented", 10_000_000)}
# Segmented: 2,048-token segments (33 for the pool), given back after 1 s idle.
SEGMENTS = ["--kv-segment-tokens", "2048", "--kv-segment-hold-off", "1"]
NEW_TOKENS = 32


def _state(server: Any) -> dict[str, Any]:
    state = server.server_info()["internal_states"][0]
    kv = state["kv_alloc"]
    segments = kv.get("segments") or {}
    return {
        "rss_bytes": server.rss_bytes(),
        # upstream's figure (GB, rounded as upstream rounds it): the pool as built
        "upstream_kvcache_gb": state["memory_usage"]["kvcache"],
        "kv_committed_bytes": segments.get("committed_bytes"),
        "kv_reserved_bytes": segments.get("reserved_bytes"),
        "kv_peak_committed_segments": segments.get("peak_committed_segments"),
        "kv_total_segments": segments.get("total_segments"),
        "req_to_token_bytes": kv.get("req_to_token_bytes"),
        "req_to_token_resident_bytes": segments.get("req_to_token_resident_bytes"),
        "effective_context_length": kv.get("effective_context_length"),
        "mode": kv.get("mode"),
    }


def main() -> None:
    from sglang_kvalloc_harness.serving import (
        LocalServer,
        fake_prefill_request,
        generate_concurrently,
        side_by_side,
    )
    from sglang_kvalloc_harness.tiny_model import build

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bursts", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model = build(Path(tempfile.mkdtemp()) / "tiny-llama")
    servers = {
        name: LocalServer(
            model,
            args=["--kv-alloc-mode", mode, "--context-length", str(context), *DECODE]
            + (SEGMENTS if mode == "segmented" else []),
            env={"SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN": "1"},
        )
        for name, (mode, context) in CONTEXTS.items()
    }
    results: dict[str, dict[str, Any]] = {}
    with side_by_side(servers.values()):
        for name, server in servers.items():
            with server.awake():
                time.sleep(2)
                start = _state(server)
                peak = start
                for burst in range(args.bursts):
                    prompts = [[5 + i, 6, 7, 8 + burst] * (150 * (i + 1)) for i in range(4)]
                    payloads = [
                        fake_prefill_request(p, 1000 * burst + i, NEW_TOKENS)
                        for i, p in enumerate(prompts)
                    ]
                    _, errors = generate_concurrently(server, payloads)
                    assert not errors, errors
                    now = _state(server)
                    peak = max(
                        peak, now, key=lambda s: (s["kv_committed_bytes"] or 0, s["rss_bytes"])
                    )
                time.sleep(4)  # past the 1 s hold-off: the idle policy gives segments back
                results[name] = {"start": start, "peak_after_a_burst": peak, "idle": _state(server)}
    out = {
        "provenance": provenance.record("benchmark/pd_decode_memory.py"),
        "setup": {
            "decode_args": DECODE,
            "contexts": CONTEXTS,
            "bursts": args.bursts,
            "new_tokens": NEW_TOKENS,
            "segmented_args": SEGMENTS,
        },  # fmt: skip
        "results": results,
    }
    text = json.dumps(out, indent=1)
    print(json.dumps(results, indent=1))
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
