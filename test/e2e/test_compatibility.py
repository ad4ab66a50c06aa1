"""Upstream serving features with `--kv-alloc-mode segmented` on the CPU engine, the rows of
docs/compatibility.md that run here: mixed chunked prefill, the overlap scheduler off, a
64-token page, chunked prefill off, the radix cache off, abort, `/flush_cache` and a weight
update from disk. Greedy tokens equal HF transformers (float32) throughout.

Two servers, started side by side and paused while the other one is asked:
- "mixed": `--enable-mixed-chunk --chunked-prefill-size 512 --disable-overlap-schedule
  --page-size 64`, and a hold-off that never passes (`inf`), so only a flush gives back;
- "no_radix": `--disable-radix-cache --chunked-prefill-size -1` (the overlap scheduler on); the
  three prompts fit one prefill batch.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import hf_greedy
from sglang_kvalloc_harness.serving import (
    LocalServer,
    generate_concurrently,
    http_json,
    http_text,
    side_by_side,
)

STRICT = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}
COMMON = ["--kv-alloc-mode", "segmented", "--dtype", "float32", "--max-total-tokens", "16384"]
SERVERS = {
    "mixed": [
        *("--enable-mixed-chunk", "--chunked-prefill-size", "512", "--disable-overlap-schedule"),
        *("--page-size", "64", "--kv-segment-tokens", "1024", "--kv-segment-hold-off", "inf"),
    ],
    # Without chunked prefill upstream reserves activation memory for --max-prefill-tokens
    # (16,384 by default: more than this machine's memory, a negative memory fraction).
    "no_radix": [
        *("--disable-radix-cache", "--chunked-prefill-size", "-1", "--max-prefill-tokens", "4096"),
        *("--kv-segment-tokens", "512", "--kv-segment-hold-off", "1"),
    ],
}
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def servers(tiny_model: Path) -> Iterator[dict[str, LocalServer]]:
    running = {
        name: LocalServer(tiny_model, args=[*COMMON, *extra], env=STRICT)
        for name, extra in SERVERS.items()
    }
    with side_by_side(running.values()):
        yield running


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    """A short prompt, one of several chunks of 512, and one in between."""
    rng = random.Random(41)
    return [[rng.randrange(3, 2048) for _ in range(n)] for n in (30, 2300, 700)]


@pytest.fixture(scope="module")
def expected(hf_model, prompts: list[list[int]]) -> list[list[int]]:
    return [hf_greedy(hf_model, p, NEW_TOKENS) for p in prompts]


def _payload(prompt: list[int], n: int = NEW_TOKENS, **extra: Any) -> dict:
    return {
        "input_ids": prompt,
        "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True},
        **extra,
    }


def _greedy(server: LocalServer, prompt: list[int], n: int = NEW_TOKENS, **extra: Any) -> dict:
    return server.generate(_payload(prompt, n, **extra), timeout=600)


def _concurrently(server: LocalServer, prompts: list[list[int]]) -> list[list[int]]:
    """All prompts at once, so prefill chunks and decode steps share batches."""
    results, errors = generate_concurrently(server, [_payload(p) for p in prompts])
    assert not errors, errors
    return [r["output_ids"] for r in results]


def _segments(server: LocalServer) -> dict:
    return server.server_info()["internal_states"][0]["kv_alloc"]["segments"]


@pytest.mark.parametrize("name", list(SERVERS))
def test_tokens_equal_hf_under_concurrent_load(
    servers: dict[str, LocalServer],
    prompts: list[list[int]],
    expected: list[list[int]],
    name: str,
) -> None:
    with servers[name].awake() as server:
        assert _concurrently(server, prompts) == expected
        assert _segments(server)["peak_committed_segments"] >= 3
        if name == "mixed":
            _prefill_while_decoding(server, prompts)
        log = server.log()
    assert "Traceback" not in log and "leak detected" not in log
    if name == "mixed":
        # Upstream mixed decode into prefill batches ("#running-req" inside a prefill line).
        assert any(
            "Prefill batch" in line and "#running-req: 0" not in line for line in log.splitlines()
        )


def _prefill_while_decoding(server: LocalServer, prompts: list[list[int]]) -> None:
    """A long prompt arrives while a request decodes, so its chunks are prefilled beside a
    running decode whatever the machine's load (the concurrent burst above mixes them only
    when its requests arrive close enough together)."""
    decoding = threading.Thread(target=lambda: _greedy(server, prompts[0], n=400))
    decodes_before = server.log().count("Decode batch")
    decoding.start()
    deadline = time.monotonic() + 120
    while server.log().count("Decode batch") == decodes_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _greedy(server, prompts[1][::-1])["output_ids"]  # 2,300 tokens, not cached
    decoding.join(timeout=600)


def test_without_the_radix_cache_nothing_is_cached_and_memory_goes_back(
    servers: dict[str, LocalServer], prompts: list[list[int]], expected: list[list[int]]
) -> None:
    with servers["no_radix"].awake() as server:
        again = _greedy(server, prompts[1])
        assert again["output_ids"] == expected[1]
        assert again["meta_info"]["cached_tokens"] == 0
        deadline = time.monotonic() + 30  # hold-off 1 s: back to the first segment
        while time.monotonic() < deadline and _segments(server)["committed_segments"] > 1:
            time.sleep(0.5)
        assert _segments(server)["committed_segments"] == 1


def test_abort_ends_a_request_and_the_server_serves_on(
    servers: dict[str, LocalServer], prompts: list[list[int]], expected: list[list[int]]
) -> None:
    with servers["mixed"].awake() as server:
        result: dict[str, Any] = {}
        long = threading.Thread(
            target=lambda: result.update(_greedy(server, prompts[2], n=4000, rid="long-one"))
        )
        long.start()
        time.sleep(2)
        http_json(server.url + "/abort_request", {"rid": "long-one"})
        long.join(timeout=120)
        assert result["meta_info"]["finish_reason"]["type"] == "abort"
        assert result["meta_info"]["completion_tokens"] < 4000
        assert _greedy(server, prompts[0])["output_ids"] == expected[0]


def test_flush_cache_gives_every_segment_back_at_once(
    servers: dict[str, LocalServer], prompts: list[list[int]]
) -> None:
    """The hold-off never passes here, so only the flush can give the memory back."""
    with servers["mixed"].awake() as server:
        _greedy(server, prompts[1])
        before = _segments(server)
        assert before["committed_segments"] >= 3  # the cached prompt holds them
        assert before["hold_off_s"] is None  # inf: JSON null
        assert "Cache flushed" in http_text(server.url + "/flush_cache")
        after = _segments(server)
        assert after["committed_segments"] == 1, after
        assert after["committed_bytes"] < before["committed_bytes"]
        assert "Cache flushed: released" in server.log()


def test_weights_updated_from_disk_serve_the_same_tokens(
    servers: dict[str, LocalServer], tiny_model: Path, prompts: list[list[int]], expected
) -> None:
    with servers["mixed"].awake() as server:
        update = http_json(
            server.url + "/update_weights_from_disk", {"model_path": str(tiny_model)}
        )
        assert update["success"], update
        assert _concurrently(server, prompts) == expected
