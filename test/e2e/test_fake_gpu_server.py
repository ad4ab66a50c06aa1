"""The GPU paths end to end in CI: the CPU engine serves while the plugin runs over the CUDA
VMM backing on the fake driver (`fake_cuda.server_api`).

Everything the plugin does on a GPU runs: KV segments, req_to_token rows and the RoPE cache
committed explicitly (nothing is committed by a first write), fixed-address RoPE in float32,
rows grown inside upstream's decode-memory check, fences, spare handles. The fake maps one
scratch granule under every uncommitted address, as a GPU does, and its fresh memory is
dirty: a write past what was committed would show in the scratch granule, and a read of
memory nobody wrote would change tokens. Not covered here (no CUDA graphs on the CPU engine):
the attention backends' graph buffers (test/unit/test_graph_buffer_hooks.py).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path

import pytest
from fake_cuda import CAPACITY_FILE_SUFFIX, MIB

from conftest import hf_greedy
from sglang_kvalloc_harness.serving import LocalServer, generate_concurrently, http_json, http_text

SUPPORT_DIR = Path(__file__).resolve().parents[1] / "support"  # the fake driver
GRANULE = 4096  # 1,024 req_to_token entries: prompts span several row granules
CONTEXT = 100_000
PROMPTS = (17, 900, 4090, 12_000)  # 12K: 12 KV segments of 1,024 tokens
LONG_DECODE = 1100  # more positions than a row granule holds: decode must grow the row


@pytest.fixture(scope="module")
def fake_gpu_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    report = tmp_path_factory.mktemp("fake-gpu") / "driver.json"
    env = {
        "SGLANG_KVALLOC_TEST_VMM_API": "fake_cuda:server_api",
        "SGLANG_KVALLOC_FAKE_CUDA_GRANULARITY": str(GRANULE),
        "SGLANG_KVALLOC_FAKE_CUDA_REPORT": str(report),
        "PYTHONPATH": os.pathsep.join([str(SUPPORT_DIR), os.environ.get("PYTHONPATH", "")]),
        "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1",
        "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN": "1",
    }
    args = [
        "--kv-alloc-mode", "segmented", "--context-length", str(CONTEXT),
        "--max-total-tokens", "40960", "--max-running-requests", "16", "--dtype", "float32",
        "--kv-segment-tokens", "1024",
        "--kv-segment-hold-off", "1", "--kv-idle-cache-tokens", "2048",
    ]  # fmt: skip
    with LocalServer(tiny_model, args=args, env=env) as server:
        server.driver_report = report  # type: ignore[attr-defined]
        yield server


def _kv(server: LocalServer) -> dict:
    return server.server_info()["internal_states"][0]["kv_alloc"]


def _driver(server: LocalServer) -> dict:
    path: Path = server.driver_report  # type: ignore[attr-defined]
    before = path.stat().st_mtime if path.exists() else 0.0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # a report written after this call began
        if path.exists() and path.stat().st_mtime > before:
            return json.loads(path.read_text())
        time.sleep(0.1)
    raise TimeoutError("the fake driver wrote no report")


def _greedy(server: LocalServer, prompt: list[int], n: int = 8) -> dict:
    params = {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}
    return server.generate({"input_ids": prompt, "sampling_params": params}, timeout=900)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(21)
    shared = [rng.randrange(3, 2048) for _ in range(3000)]
    out = [[rng.randrange(3, 2048) for _ in range(n)] for n in PROMPTS]
    return [*out, shared + [5, 6, 7], shared + [8, 9]]  # two with a shared prefix


def test_the_gpu_paths_are_in_force(fake_gpu_server: LocalServer) -> None:
    kv = _kv(fake_gpu_server)
    assert kv["mode"] == "segmented" and kv["lazy_tables"] and kv["kv_on_demand"]
    seg = kv["segments"]
    assert "vmm" in seg and seg["vmm"]["handles_created"] > 0
    assert seg["rope_committed_bytes"] > 0  # fixed-address RoPE, committed at start
    # req_to_token's room: 17 rows of 400 KB at most, well within static's share of the KV
    # pool, so the pool keeps none of it back (static pays its whole table from the slack).
    assert 0 < seg["row_room_bytes"] <= -(-17 * 400_016 // GRANULE) * GRANULE
    assert seg["run_time_room_bytes"] == 0
    log = fake_gpu_server.log()
    assert "reserved at a fixed address" in log
    assert _driver(fake_gpu_server)["scratch_mappings"] > 100  # one granule under many


def test_tokens_equal_hf_across_segments_rows_and_prefix_hits(
    fake_gpu_server: LocalServer, prompts: list[list[int]], hf_model
) -> None:
    expected = [hf_greedy(hf_model, p, 8) for p in prompts]
    first = [_greedy(fake_gpu_server, p)["output_ids"] for p in prompts]
    assert first == expected
    again = [_greedy(fake_gpu_server, p) for p in prompts]
    assert [o["output_ids"] for o in again] == expected
    assert again[-1]["meta_info"]["cached_tokens"] >= 3000  # the shared prefix, from cache
    seg = _kv(fake_gpu_server)["segments"]
    assert seg["peak_committed_segments"] >= 12
    assert seg["req_to_token_row_commit_failures"] == 0


def test_a_long_decode_grows_its_row_and_equals_hf(
    fake_gpu_server: LocalServer, prompts: list[list[int]], hf_model
) -> None:
    """Decode positions past the granules committed at admission: committed inside upstream's
    decode-memory check before they are written (else they land on the scratch granule)."""
    out = _greedy(fake_gpu_server, prompts[0], LONG_DECODE)["output_ids"]
    assert out == hf_greedy(hf_model, prompts[0], LONG_DECODE)


def test_a_burst_with_an_abort_then_idle_gives_memory_back(
    fake_gpu_server: LocalServer, prompts: list[list[int]], hf_model
) -> None:
    server = fake_gpu_server
    results: list[dict] = []

    def run(prompt: list[int]) -> None:
        results.append(_greedy(server, prompt, 6))

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts[:4]]
    for t in threads:
        t.start()
    # A long request aborted mid-way (its rows and KV go back on every path).
    params = {"max_new_tokens": 2000, "temperature": 0, "ignore_eos": True}
    aborted = {"input_ids": prompts[3][:5000], "rid": "to-abort", "sampling_params": params}
    abort_thread = threading.Thread(target=lambda: results.append(server.generate(aborted)))
    abort_thread.start()
    time.sleep(3)
    http_json(server.url + "/abort_request", {"rid": "to-abort"})
    for t in [*threads, abort_thread]:
        t.join(timeout=900)
    assert len(results) == 5
    cut = next(r for r in results if r["meta_info"]["id"] == "to-abort")
    assert cut["meta_info"]["finish_reason"]["type"] == "abort"
    busy = _kv(server)["segments"]["committed_bytes"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _kv(server)["segments"]["committed_bytes"] >= busy:
        time.sleep(0.5)
    idle = _kv(server)["segments"]
    assert idle["committed_bytes"] < busy
    # Served right after the burst, the abort and the release: same tokens as HF.
    assert _greedy(server, prompts[1])["output_ids"] == hf_greedy(hf_model, prompts[1], 8)


def test_steady_serving_waits_for_no_device(
    fake_gpu_server: LocalServer, prompts: list[list[int]]
) -> None:
    """Requests arriving and finishing with the KV segments they need committed already:
    no device synchronize at all (each would stall the overlap scheduler on a GPU)."""
    server = fake_gpu_server
    for p in prompts[:3]:
        _greedy(server, p, 4)  # commits what this load needs
    before, kv_before = _driver(server), _kv(server)["segments"]
    for _ in range(2):
        for p in prompts[:3]:
            _greedy(server, p, 4)
    after, kv_after = _driver(server), _kv(server)["segments"]
    if (
        kv_after["commits"] == kv_before["commits"]
        and kv_after["releases"] == kv_before["releases"]
    ):
        assert after["device_synchronizes"] == before["device_synchronizes"]
    else:  # a hold-off release raced the loop: only those may have waited
        grown = (kv_after["commits"] - kv_before["commits"]) + (
            kv_after["releases"] - kv_before["releases"]
        )
        # One device wait per segment committed or released (whatever the layer count).
        assert after["device_synchronizes"] - before["device_synchronizes"] <= grown


def test_a_full_device_queues_a_prefix_sharing_burst_and_never_raises(
    fake_gpu_server: LocalServer, prompts: list[list[int]], hf_model
) -> None:
    """50 requests sharing a 3,000-token prefix on a device with a few rows' memory to spare:
    prefix hits let upstream admit far more requests than their full lengths suggest, and
    upstream raises when a row cannot be allocated (it did: "alloc_req_slots runs out of
    memory", 48 of 50 failed). Admission now takes only the rows the device can back; the
    rest wait in the queue and every request completes."""
    server = fake_gpu_server
    # A flushed cache holds nothing, and the flush gives back segments and spare handles: the
    # device then holds what a fresh server does, whatever the tests before this one left.
    assert "Cache flushed" in http_text(server.url + "/flush_cache")
    time.sleep(1)
    control = Path(f"{server.driver_report}{CAPACITY_FILE_SUFFIX}")  # type: ignore[attr-defined]
    control.write_text(str(_driver(server)["physical_bytes"] + 2800 * 1024))
    try:
        time.sleep(1)  # the fake reads the file every half second
        rng = random.Random(50)
        shared = prompts[-1][:3000]
        burst = [shared + [rng.randrange(3, 2048) for _ in range(10)] for _ in range(50)]
        params = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
        results, errors = generate_concurrently(
            server, [{"input_ids": p, "sampling_params": params} for p in burst]
        )
        assert errors == [] and all(r is not None for r in results)
        for i in (0, 25, 49):
            assert results[i]["output_ids"] == hf_greedy(hf_model, burst[i], 8)
        assert "req_to_token rows for the queued requests cannot all be committed" in server.log()
        assert _kv(server)["segments"]["req_to_token_row_commit_failures"] == 0
    finally:
        control.write_text(str(2048 * MIB))
    assert _greedy(server, prompts[0])["output_ids"]  # still serving


def test_rl_release_gives_the_device_back_and_resume_serves_again(
    fake_gpu_server: LocalServer, prompts: list[list[int]], hf_model
) -> None:
    """RL's /release_memory_occupation over the CUDA backing (issue 35): every KV segment,
    req_to_token granule (the padding row's too), RoPE granule and spare handle goes back:
    the device holds its scratch handles alone; resume commits nothing until a request, which
    is served as HF serves it (RoPE and the padding row restored first)."""
    server = fake_gpu_server
    _greedy(server, prompts[2])  # something committed
    http_json(server.url + "/release_memory_occupation", {"tags": ["kv_cache"]})
    time.sleep(0.6)  # the fake reports every half second
    released = _driver(server)["physical_bytes"]
    assert released <= 5 * GRANULE, released  # the granule scratch and the 4-granule chunk
    assert _kv(server)["segments"]["committed_bytes"] == 0
    http_json(server.url + "/resume_memory_occupation", {"tags": ["kv_cache"]})
    assert _driver(server)["physical_bytes"] == released  # nothing until asked
    assert _greedy(server, prompts[0])["output_ids"] == hf_greedy(hf_model, prompts[0], 8)
    assert _greedy(server, prompts[-1])["output_ids"] == hf_greedy(hf_model, prompts[-1], 8)
    assert _driver(server)["physical_bytes"] > released


def test_the_scratch_granule_is_still_all_zeros(fake_gpu_server: LocalServer) -> None:
    """Runs last in this module: after everything above, nothing was ever written where
    nothing was committed."""
    report = _driver(fake_gpu_server)
    assert report["scratch_nonzero_bytes"] == 0, report
