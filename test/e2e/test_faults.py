"""Faults on a segmented server: another process takes the memory while requests need to grow.

The server's processes are moved into a memory cgroup with a limit, and a second process in
the same cgroup takes most of what is left. Commits then fail (the CPU backing refuses a
commit the cgroup cannot hold instead of letting the OOM killer act), the pool withholds what
it cannot back, requests queue as for a full pool, and once the other process exits the next
retry lifts the limit and every request finishes. Skipped where no memory cgroup can be made.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sglang.srt.mem_cache.segmented.cpu_backing import COMMIT_RESERVE_BYTES

from sglang_kvalloc_harness.serving import LocalServer, http_text

MB = 1 << 20
STRICT = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}


class MemoryCgroup:
    """A child memory cgroup (v1 or v2) this test creates and removes."""

    def __init__(self, name: str) -> None:
        v1 = Path("/sys/fs/cgroup/memory")
        v2 = Path("/sys/fs/cgroup")
        if v1.is_dir():
            self.path = v1 / name
            self.limit_file = "memory.limit_in_bytes"
        elif (v2 / "cgroup.controllers").exists() and "memory" in (
            v2 / "cgroup.subtree_control"
        ).read_text():
            self.path = v2 / name
            self.limit_file = "memory.max"
        else:
            raise OSError("no memory cgroup controller")
        self.path.mkdir()

    def set_limit(self, nbytes: int) -> None:
        (self.path / self.limit_file).write_text(str(nbytes))

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.2)


@pytest.fixture
def cgroup():
    try:
        group = MemoryCgroup(f"sglang-kvalloc-test-{os.getpid()}")
    except OSError as exc:
        pytest.skip(f"cannot create a memory cgroup here: {exc}")
    yield group
    group.remove()


HOG = """
import sys, time
block = bytearray(int(sys.argv[1]))
block[::4096] = b"x" * len(block[::4096])
print("taken", flush=True)
time.sleep(3600)
"""


def _kv(server: LocalServer) -> dict:
    return server.server_info()["internal_states"][0]["kv_alloc"]


def _start_all(
    server: LocalServer, prompts: list[list[int]]
) -> tuple[list[threading.Thread], list[dict], list[BaseException]]:
    results: list[dict] = []
    errors: list[BaseException] = []

    def run(prompt: list[int]) -> None:
        try:
            # ignore_eos: a random-weight model may sample its EOS early; only an abort may cut.
            params = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
            payload = {"input_ids": prompt, "sampling_params": params}
            results.append(server.generate(payload, timeout=600))
        except BaseException as exc:  # surfaced by the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    return threads, results, errors


def _run_all(server: LocalServer, prompts: list[list[int]]) -> tuple[list[dict], list]:
    threads, results, errors = _start_all(server, prompts)
    for t in threads:
        t.join(timeout=600)
    return results, errors


def test_another_process_takes_the_memory_mid_growth(tiny_model: Path, cgroup) -> None:
    args = ["--kv-alloc-mode", "segmented", "--max-total-tokens", "262144", "--dtype", "float32"]
    args += ["--kv-segment-tokens", "2048", "--kv-segment-hold-off", "1"]
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 2048) for _ in range(2000)] for _ in range(48)]
    with LocalServer(tiny_model, args=args, env=STRICT) as server:
        # A first pass grows the processes' heaps to their working size outside the cgroup
        # (a freed heap is reused, not charged again); then the KV goes back.
        assert _run_all(server, prompts)[1] == []
        http_text(server.url + "/flush_cache")  # gives the segments back at once
        assert _kv(server)["segments"]["committed_segments"] == 1
        # From here on what the server allocates is charged to the cgroup: KV segments
        # (1 MB each) and whatever else it touches. Room for ~40 MB of it above the reserve.
        cgroup.set_limit(COMMIT_RESERVE_BYTES + 240 * MB)
        for pid in server.pids():
            cgroup.add(pid)
        hog = subprocess.Popen(
            [sys.executable, "-c", HOG, str(200 * MB)],
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: cgroup.add(os.getpid()),
        )
        try:
            assert hog.stdout is not None and hog.stdout.readline().strip() == "taken"
            start = _kv(server)["segments"]
            threads, results, errors = _start_all(server, prompts)
            deadline = time.monotonic() + 300
            seg = start
            while time.monotonic() < deadline:
                seg = _kv(server)["segments"]
                if seg["commit_failures"] >= 1 and seg["withheld_tokens"] > 0:
                    break
                time.sleep(0.3)
            assert seg["commit_failures"] >= 1, seg
            assert any(t.is_alive() for t in threads)  # requests are waiting, not failed
            assert server.generate({"text": "up", "sampling_params": {"max_new_tokens": 1}})
        finally:
            hog.kill()
            hog.wait()
        for t in threads:
            t.join(timeout=600)
        assert not errors, errors[:3]
        assert len(results) == 48
        finishes = [
            (r["meta_info"]["completion_tokens"], r["meta_info"]["finish_reason"]) for r in results
        ]
        assert all(tokens == 8 for tokens, _ in finishes), finishes
        # The memory is back: within a retry interval or two the limit is lifted.
        deadline = time.monotonic() + 30
        seg = _kv(server)["segments"]
        while seg["withheld_tokens"] and time.monotonic() < deadline:
            time.sleep(0.5)
            seg = _kv(server)["segments"]
        assert seg["withheld_tokens"] == 0, seg
        assert seg["committed_bytes"] > start["committed_bytes"]
        print(f"mid-batch commits: {seg['mid_batch_commits']}, failures {seg['commit_failures']}")
        log = server.log()
        assert "KV segment commit failed" in log
        assert "KV segment commits succeed again" in log
        assert "memory leak detected" not in log
        assert "Traceback" not in log
