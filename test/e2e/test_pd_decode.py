"""PD disaggregation, stage 1 (issue 36): a decode server at a 10M context starts and serves in
segmented mode on the CPU engine, driven through upstream's own PD decode loop with its fake
transfer backend (no prefill peer: upstream synthesises each request's first token)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from sglang_kvalloc_harness.serving import (
    LocalServer,
    fake_prefill_request,
    generate_concurrently,
    side_by_side,
)

pytestmark = pytest.mark.e2e

MB = 1_000_000
OVERRIDE = {"SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN": "1"}
# A leak found by upstream's idle check (free rows + held rows == size + pre-allocation rows)
# raises instead of warning.
STRICT = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}
# Upstream's decode defaults to a HiCache host pool as the retraction backup, which registers
# host memory with CUDA; the CPU engine keeps retracted KV in CPU tensors instead.
DECODE = ["--disaggregation-mode", "decode", "--disaggregation-transfer-backend", "fake"]
DECODE += ["--disaggregation-decode-retraction-backup", "cpu_tensor"]
DECODE += ["--max-total-tokens", "65536", "--dtype", "float32"]


def _kv(server: LocalServer) -> dict:
    return server.server_info()["internal_states"][0]["kv_alloc"]


def test_a_decode_server_at_10m_context_starts_and_serves_at_4k_static_memory(
    tiny_model: Path,
) -> None:
    """Static's decode table at 10M is (max running + pre-allocation slots + 1) x 10M int32,
    tens of GB; segmented reserves it and holds only what rows hold, and commits its KV pool
    a segment at a time. Its resident memory is a
    static decode server's at 4K, it serves bursts through the pre-allocation and transfer
    queues, and upstream's idle leak check (strict) passes."""
    segmented = LocalServer(
        tiny_model,
        args=["--kv-alloc-mode", "segmented", "--context-length", "10000000", *DECODE]
        + ["--kv-segment-tokens", "2048", "--kv-segment-hold-off", "1"],
        env={**OVERRIDE, **STRICT},
    )
    static = LocalServer(
        tiny_model, args=["--kv-alloc-mode", "static", "--context-length", "4096", *DECODE]
    )
    with side_by_side([segmented, static]):
        with static.awake():
            time.sleep(2)
            static_rss = static.rss_bytes()
        with segmented.awake():
            time.sleep(2)
            seg_rss = segmented.rss_bytes()
            kv = _kv(segmented)
            assert kv["mode"] == "segmented" and kv["lazy_tables"] and kv["kv_on_demand"]
            assert kv["segments"]["committed_segments"] == 1
            assert kv["effective_context_length"] == 10_000_000
            assert kv["req_to_token_bytes"] > 10e9  # reserved, not committed
            assert kv["segments"]["req_to_token_resident_bytes"] < 1 * MB
            for burst in range(3):
                prompts = [[5 + i, 6, 7, 8 + burst] * (50 * (i + 1)) for i in range(4)]
                payloads = [
                    fake_prefill_request(p, 1000 * burst + i, 8) for i, p in enumerate(prompts)
                ]
                results, errors = generate_concurrently(segmented, payloads)
                assert not errors, errors
                assert all(r["meta_info"]["completion_tokens"] == 8 for r in results)
            time.sleep(3)  # idle: upstream's strict leak check runs
            assert segmented.proc is not None and segmented.proc.poll() is None
            segments = _kv(segmented)["segments"]
            assert segments["req_to_token_resident_bytes"] < 1 * MB  # rows gave pages back
            # The pre-allocation queue's demand committed KV segments; idle, they went back.
            assert segments["peak_committed_segments"] >= 2
            assert segments["committed_segments"] == 1
            assert segments["mid_batch_commits"] == 0  # the commit-ahead covered every one
        assert "Segmented decode req_to_token" in segmented.log()
    table = kv["req_to_token_bytes"] / 1e9
    print(f"RSS static decode@4K {static_rss / MB:.1f} MB, segmented decode@10M "
          f"{seg_rss / MB:.1f} MB (its table: {table:.1f} GB reserved)")  # fmt: skip
    # No more than static's at 4K (less: its KV pool is committed a segment at a time).
    assert seg_rss < static_rss + 100 * MB
