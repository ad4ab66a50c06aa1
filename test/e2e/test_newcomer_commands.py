"""The commands a new user types, with no extra flags: upstream's default pool size (about 70%
of free memory on the CPU), dtype and page size; contexts below, at and above the model's
maximum (65,536 positions for the tiny model), with and without upstream's override.

    SGLANG_USE_CPU_ENGINE=1 python -m sglang.launch_server --model-path models/tiny-llama \\
        --device cpu --kv-alloc-mode auto --context-length 10000000
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sglang_kvalloc_harness.serving import CPU_ENV, LocalServer, side_by_side

MODEL_MAX = 65_536
OVERRIDE = "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"
GB = 1e9


@pytest.fixture(autouse=True)
def _no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(OVERRIDE, raising=False)


def _answers(server: LocalServer) -> None:
    out = server.generate(
        {
            "text": "Hello world",
            "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True},
        }
    )
    assert out["meta_info"]["completion_tokens"] == 6
    long_prompt = {
        "input_ids": [7] * 1500,
        "sampling_params": {"max_new_tokens": 2, "ignore_eos": True},
    }
    assert server.generate(long_prompt)["meta_info"]["completion_tokens"] == 2


@pytest.fixture(scope="class")
def headline_servers(tiny_model: Path) -> Iterator[dict[str, LocalServer]]:
    """The headline command as typed and with upstream's override, started side by side (both
    reserve their default pools as address space, so neither sizes the other's) and paused
    until asked; stopped before the other tests of this file size their pools (a static
    default pool started beside them was OOM-killed on a 24 GB machine)."""
    args = ["--kv-alloc-mode", "auto", "--context-length", "10000000"]
    servers = {
        "as_typed": LocalServer(tiny_model, args=args),
        "override": LocalServer(tiny_model, args=args, env={OVERRIDE: "1"}),
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(OVERRIDE, raising=False)  # as _no_override, which runs after this
        with side_by_side(servers.values()):
            yield servers


class TestHeadlineCommand:
    def test_as_typed(self, headline_servers: dict[str, LocalServer]) -> None:
        """Above the model maximum, no override: auto clamps to the model maximum, says so,
        and serves; the default pool is far larger than one request, so segmented is chosen
        for the context-sized tables (4,097 request slots x 65,540 int32)."""
        with headline_servers["as_typed"].awake() as server:
            log = server.log()
            clamp = [line for line in log.splitlines() if "clamped to 65536" in line]
            assert clamp and "10000000" in clamp[0] and OVERRIDE in clamp[0], log[-3000:]
            info = server.server_info()
            assert info["context_length"] == MODEL_MAX
            kv = info["internal_states"][0]["kv_alloc"]
            assert kv["requested_context_length"] == 10_000_000
            assert kv["effective_context_length"] == MODEL_MAX
            assert kv["mode"] == "segmented", kv["reason"]
            # Upstream's default pool: tens of millions of tokens on this machine, reserved.
            assert kv["token_capacity"] > 10 * MODEL_MAX
            assert kv["segments"]["reserved_bytes"] > 1 * GB
            assert kv["segments"]["committed_segments"] <= 2
            _answers(server)
            # Committed memory follows use, not the default pool's size.
            now = server.server_info()["internal_states"][0]["kv_alloc"]["segments"]
            assert now["committed_bytes"] < 0.05 * kv["segments"]["reserved_bytes"]

    def test_with_upstreams_override(self, headline_servers: dict[str, LocalServer]) -> None:
        """With the override the 10M context stands (the default pool holds more than one 10M
        request here) and the 82 GB-class req_to_token table is only reserved."""
        with headline_servers["override"].awake() as server:
            kv = server.server_info()["internal_states"][0]["kv_alloc"]
            assert kv["mode"] == "segmented"
            if kv["token_capacity"] >= 10_000_000:
                assert kv["effective_context_length"] == 10_000_000
                assert "clamped" not in server.log()
            else:  # a machine with less free memory: clamped to the pool, with a warning
                assert kv["effective_context_length"] == kv["token_capacity"]
                assert "clamped to" in server.log()
            assert kv["req_to_token_bytes"] > 10 * GB
            assert kv["segments"]["req_to_token_resident_bytes"] < 0.01 * GB
            _answers(server)


def test_context_below_the_model_maximum_is_upstream_static(tiny_model: Path) -> None:
    """An ordinary context with the default pool: auto is upstream's static mode (the whole
    pool allocated at start, as upstream does)."""
    server = LocalServer(tiny_model, args=["--kv-alloc-mode", "auto", "--context-length", "2048"])
    with server:
        kv = server.server_info()["internal_states"][0]["kv_alloc"]
        assert kv["mode"] == "static", kv["reason"]
        assert "segments" not in kv
        assert kv["effective_context_length"] == 2048
        assert "clamped" not in server.log()
        _answers(server)


ENGINE_AS_TYPED = """
import json, sys
import sglang

engine = sglang.Engine(
    model_path=sys.argv[1], device="cpu", kv_alloc_mode="auto", context_length=10_000_000
)
try:
    info = engine.get_server_info()
    out = engine.generate("Hello world", {"max_new_tokens": 5, "temperature": 0})
    print("RESULT " + json.dumps({"info": info, "completion_tokens":
                                  out["meta_info"]["completion_tokens"]}, default=str))
finally:
    engine.shutdown()
"""


def test_engine_as_typed_above_the_maximum(tiny_model: Path) -> None:
    """`sglang.Engine` as typed, with the `kv_alloc_mode` keyword: a 10M context clamps to the
    model maximum like the server. In its own interpreter, as a user's script: the engine's
    shutdown kills every child process of the one that made it (upstream's
    kill_process_tree), which in pytest would include the session's other servers."""
    env = {key: value for key, value in os.environ.items() if key != OVERRIDE}
    proc = subprocess.run(
        [sys.executable, "-c", ENGINE_AS_TYPED, str(tiny_model)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**env, **CPU_ENV},
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    result = json.loads(lines[-1].removeprefix("RESULT "))
    info = result["info"]
    kv = info["internal_states"][0]["kv_alloc"]
    assert info["kv_alloc_mode"] == "auto"  # the keyword reached the scheduler
    assert kv["requested_mode"] == "auto"
    assert info["context_length"] == MODEL_MAX
    assert kv["requested_context_length"] == 10_000_000
    assert kv["mode"] == "segmented"
    assert result["completion_tokens"] == 5
