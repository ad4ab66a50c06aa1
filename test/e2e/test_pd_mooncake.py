"""PD disaggregation as users run it, on the CPU engine (issue 36): a prefill server and a
decode server at a 10M context, both segmented with their KV committed on demand, KV moved by
Mooncake's transfer engine over TCP (registered segment by segment), the sglang-router in
front. Tokens equal one static server's and HF transformers'. A
static prefill server feeds the same decode server by the router's own protocol (the same JSON
to both at once), and an abort mid-transfer leaves both sides serving."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import ReferenceStatic, hf_greedy, parity_prompts
from sglang_kvalloc_harness.serving import (
    LocalServer,
    free_port,
    generate_concurrently,
    http_json,
    side_by_side,
)

pytestmark = pytest.mark.e2e

MB = 1_000_000
NEW_TOKENS = 8
# Mooncake over TCP on the loopback (upstream's settings).
MOONCAKE = {"SGLANG_HOST_IP": "127.0.0.1", "MOONCAKE_PROTOCOL": "tcp", "MC_FORCE_TCP": "1"}
COMMON = ["--dtype", "float32", "--max-total-tokens", "65536"]
COMMON += ["--disaggregation-transfer-backend", "mooncake"]
# Segmented servers: small segments, so a burst commits several; once idle for 1 s, no cached
# KV retained (the prefill side's radix cache keeps 8,192 tokens by default).
SEGMENTS = ["--kv-segment-tokens", "2048", "--kv-segment-hold-off", "1"]
SEGMENTS += ["--kv-idle-cache-tokens", "0"]


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
        return http_json(self.url + "/generate", payload, timeout=timeout)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def prefill_server(model: Path, bootstrap_port: int, mode: str) -> LocalServer:
    return LocalServer(
        model,
        args=[*COMMON, "--kv-alloc-mode", mode, "--context-length", "4096"]
        + (SEGMENTS if mode == "segmented" else [])
        + [
            "--disaggregation-mode",
            "prefill",
            "--disaggregation-bootstrap-port",
            str(bootstrap_port),
        ],
        env=MOONCAKE,
    )


@dataclass
class Pd:
    prefill: LocalServer  # segmented, behind the router
    bootstrap_port: int
    decode: LocalServer  # segmented, at 10M
    router: Router
    static_prefill: LocalServer  # fed to the decode server by hand
    static_bootstrap_port: int


@pytest.fixture(scope="module")
def pd(tiny_model: Path) -> Iterator[Pd]:
    bootstrap = free_port()
    prefill = prefill_server(tiny_model, bootstrap, "segmented")
    static_bootstrap = free_port()
    static_prefill = prefill_server(tiny_model, static_bootstrap, "static")
    decode = LocalServer(
        tiny_model,
        args=[
            *COMMON,
            "--kv-alloc-mode",
            "segmented",
            "--context-length",
            "10000000",
            "--disaggregation-mode",
            "decode",
            *SEGMENTS,
        ]
        # upstream's default backup registers host memory with CUDA (docs/usage.md)
        + ["--disaggregation-decode-retraction-backup", "cpu_tensor"],
        env={**MOONCAKE, "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN": "1"},
    )
    with side_by_side([prefill, decode, static_prefill]):
        for server in (prefill, decode, static_prefill):
            server.resume()
        router = Router(prefill, bootstrap, decode)
        try:
            yield Pd(prefill, bootstrap, decode, router, static_prefill, static_bootstrap)
        finally:
            router.stop()


def by_the_routers_protocol(
    prefill: LocalServer, bootstrap_port: int, decode: LocalServer, payload: dict
) -> tuple[list[Any], list[BaseException]]:
    """What the router does for one request: the same JSON, with the prefill server's
    bootstrap address and a fresh room, to prefill and decode at once. [prefill's, decode's]."""
    both = {
        **payload,
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": bootstrap_port,
        "bootstrap_room": random.randint(0, 2**63 - 1),
    }
    results: list[Any] = [None, None]
    errors: list[BaseException] = []

    def post(index: int, server: LocalServer) -> None:
        try:
            results[index] = server.generate(both, timeout=300)
        except BaseException as exc:  # handed to the caller
            errors.append(exc)

    threads = [threading.Thread(target=post, args=pair) for pair in enumerate((prefill, decode))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, errors


def _payload(prompt: list[int]) -> dict:
    return {
        "input_ids": prompt,
        "sampling_params": {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True},
    }


def test_tokens_through_the_router_equal_one_static_server_and_hf(
    pd: Pd, reference_static: ReferenceStatic, hf_model: object
) -> None:
    prefill, decode, router = pd.prefill, pd.decode, pd.router
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
    # The decode server at 10M: its table reserved, not resident. Both sides committed KV
    # segments as the burst needed them (the transfer engine registering each), and give them
    # back to the first once idle.
    kv = _kv(decode)
    assert kv["mode"] == "segmented" and kv["lazy_tables"] and kv["kv_on_demand"]
    assert kv["effective_context_length"] == 10_000_000
    assert kv["segments"]["req_to_token_resident_bytes"] < 1 * MB
    for server in (prefill, decode):
        segments = _kv(server)["segments"]
        assert segments["peak_committed_segments"] >= 2, segments
        assert segments["commit_failures"] == 0
        assert "KV transfer registrations follow the committed segments" in server.log()
        assert server.proc is not None and server.proc.poll() is None
    for server in (prefill, decode):
        assert _back_to_the_first_segment(server), _kv(server)["segments"]


def _kv(server: LocalServer) -> dict[str, Any]:
    return server.server_info()["internal_states"][0]["kv_alloc"]


def _back_to_the_first_segment(server: LocalServer, within_s: float = 30) -> bool:
    """The idle policy (hold-off 1 s) gave every KV segment but the first back."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        segments = _kv(server)["segments"]
        if segments["committed_segments"] == 1:
            first = segments["committed_bytes"]
            return first <= segments["reserved_bytes"] / segments["total_segments"] + 1 * MB
        time.sleep(0.5)
    return False


def test_a_static_prefill_server_feeds_the_segmented_decode_server(
    pd: Pd, hf_model: object
) -> None:
    """Mixed: upstream's static prefill, this package's segmented decode at 10M, by the
    router's own two-request protocol."""
    prompts = parity_prompts(hf_model.config.vocab_size)[:3]  # type: ignore[attr-defined]
    for prompt in prompts:
        results, errors = by_the_routers_protocol(
            pd.static_prefill, pd.static_bootstrap_port, pd.decode, _payload(prompt)
        )
        assert not errors, errors
        assert results[1]["output_ids"] == hf_greedy(hf_model, prompt, NEW_TOKENS)


def test_an_abort_mid_transfer_leaves_both_sides_serving(pd: Pd, hf_model: object) -> None:
    """A long request aborted on the decode side while the prefill side computes and sends
    its KV (a prompt no cache holds, 3,500 tokens): the request ends as aborted, no server
    dies, no row or page is lost (later requests get HF's tokens, the decode table back under
    1 MB resident)."""
    vocab = hf_model.config.vocab_size  # type: ignore[attr-defined]
    fresh = parity_prompts(vocab, seed=36)[-1] * 2  # 4,600 ids; the prefill context is 4,096
    payload = {
        "input_ids": fresh[:3500],
        "sampling_params": {"max_new_tokens": 400, "temperature": 0, "ignore_eos": True},
        "rid": "pd-abort-mid-transfer",
    }
    done: list[tuple[list[Any], list[BaseException]]] = []
    sender = threading.Thread(
        target=lambda: done.append(
            by_the_routers_protocol(pd.prefill, pd.bootstrap_port, pd.decode, payload)
        )
    )
    sender.start()
    # Upstream drops an abort for a request its tokenizer has not registered yet (a loaded
    # machine can take longer than the first 0.3 s): aborted again until the request ends.
    deadline = time.monotonic() + 120
    while sender.is_alive() and time.monotonic() < deadline:
        time.sleep(0.3)
        http_json(pd.decode.url + "/abort_request", {"rid": "pd-abort-mid-transfer"})
    sender.join(timeout=300)
    assert done, "the aborted request never returned on either side"
    results, errors = done[0]
    decoded = results[1]
    # Aborted in the handshake or transfer, upstream answers 500 ("Aborted by AbortReq"); in
    # decoding, a response whose finish reason is abort. Never 400 tokens.
    assert (decoded is None and errors) or decoded["meta_info"]["finish_reason"]["type"] == "abort"
    for server in (pd.prefill, pd.decode):
        assert server.proc is not None and server.proc.poll() is None, server.log_tail()
    prompts = parity_prompts(vocab)
    for prompt in prompts[:2]:
        assert pd.router.generate(_payload(prompt))["output_ids"] == hf_greedy(
            hf_model, prompt, NEW_TOKENS
        )
    assert _kv(pd.decode)["segments"]["req_to_token_resident_bytes"] < 1 * MB
    for server in (pd.prefill, pd.decode):  # no page lost: every segment but the first back
        assert _back_to_the_first_segment(server), _kv(server)["segments"]
