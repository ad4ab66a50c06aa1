"""PD disaggregation as users run it, on the CPU engine (issue 36): a prefill server and a
decode server at a 10M context, both segmented, KV moved by Mooncake's transfer engine over
TCP, the sglang-router in front. Tokens equal one static server's and HF transformers'."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ReferenceStatic, hf_greedy, parity_prompts
from sglang_kvalloc_harness.serving import (
    LocalServer,
    free_port,
    generate_concurrently,
    side_by_side,
)

pytestmark = pytest.mark.e2e

MB = 1_000_000
NEW_TOKENS = 8
# Mooncake over TCP on the loopback (upstream's settings).
MOONCAKE = {"SGLANG_HOST_IP": "127.0.0.1", "MOONCAKE_PROTOCOL": "tcp", "MC_FORCE_TCP": "1"}
COMMON = ["--kv-alloc-mode", "segmented", "--dtype", "float32", "--max-total-tokens", "65536"]
COMMON += ["--disaggregation-transfer-backend", "mooncake"]


class Router:
    """`python -m sglang_router.launch_router --pd-disaggregation` on 127.0.0.1."""

    def __init__(self, prefill: LocalServer, bootstrap_port: int, decode: LocalServer) -> None:
        self.port = free_port()
        self.log = Path(f"/tmp/sglang-kvalloc-router-{self.port}.log")
        command = [sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation"]
        command += ["--prefill", prefill.url, str(bootstrap_port), "--decode", decode.url]
        command += ["--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(command, stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:  # /readiness: once both workers are registered (/health answers before)
                with urllib.request.urlopen(self.url + "/readiness", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(self.log.read_text()[-3000:])

    def generate(self, payload: dict, timeout: float = 600) -> dict:
        from sglang_kvalloc_harness.serving import http_json

        return http_json(self.url + "/generate", payload, timeout=timeout)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def pd(tiny_model: Path) -> Iterator[tuple[LocalServer, LocalServer, Router]]:
    bootstrap = free_port()
    prefill = LocalServer(
        tiny_model,
        args=[*COMMON, "--context-length", "4096", "--disaggregation-mode", "prefill"]
        + ["--disaggregation-bootstrap-port", str(bootstrap)],
        env=MOONCAKE,
    )
    decode = LocalServer(
        tiny_model,
        args=[*COMMON, "--context-length", "10000000", "--disaggregation-mode", "decode"]
        # upstream's default backup registers host memory with CUDA (docs/usage.md)
        + ["--disaggregation-decode-retraction-backup", "cpu_tensor"],
        env={**MOONCAKE, "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN": "1"},
    )
    with side_by_side([prefill, decode]):
        prefill.resume()
        decode.resume()
        router = Router(prefill, bootstrap, decode)
        try:
            yield prefill, decode, router
        finally:
            router.stop()


def _payload(prompt: list[int]) -> dict:
    return {
        "input_ids": prompt,
        "sampling_params": {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True},
    }


def test_tokens_through_the_router_equal_one_static_server_and_hf(
    pd: tuple[LocalServer, LocalServer, Router],
    reference_static: ReferenceStatic,
    hf_model: object,
) -> None:
    prefill, decode, router = pd
    prompts = parity_prompts(hf_model.config.vocab_size)  # type: ignore[attr-defined]
    # Singles (one over 2,000 tokens), then two sharing a 1,500-token prefix (a radix hit on
    # the prefill side).
    shared = [prompts[3][:1500] + p for p in prompts[:2]]
    for prompt in [*prompts, *shared]:
        got = router.generate(_payload(prompt))["output_ids"]
        static = reference_static.server.generate(_payload(prompt))["output_ids"]
        assert got == static == hf_greedy(hf_model, prompt, NEW_TOKENS)
    # All at once: prefill and decode batch them; every transfer lands where it should.
    results, errors = generate_concurrently(router, [_payload(p) for p in prompts])  # type: ignore[arg-type]
    assert not errors, errors
    assert [r["output_ids"] for r in results] == [
        hf_greedy(hf_model, p, NEW_TOKENS) for p in prompts
    ]
    # The decode server at 10M: its table reserved, not resident; both kept the KV pool whole.
    kv = decode.server_info()["internal_states"][0]["kv_alloc"]
    assert kv["mode"] == "segmented" and kv["lazy_tables"] and not kv["kv_on_demand"]
    assert kv["effective_context_length"] == 10_000_000
    assert kv["segments"]["req_to_token_resident_bytes"] < 1 * MB
    for server in (prefill, decode):
        assert server.proc is not None and server.proc.poll() is None
