"""The kit's PD phase (issue 36): a PD decode server in segmented mode at a 10M context, with
upstream's fake transfer backend (no prefill peer: upstream synthesises each request's first
token), bursts of requests through its pre-allocation and transfer queues.

Where segmented mode serves PD (the CPU engine): it starts, commits KV segments as the requests
need them (none inside an allocation) and gives them back once idle. Where it refuses PD (a
GPU): the refusal is one line naming the flag, and auto at the same context then starts (static
where it fits) or refuses in one line; what the device did is recorded either way.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kit_phases import Stage
    from kit_server import KitServer

DECODE = ["--disaggregation-mode", "decode", "--disaggregation-transfer-backend", "fake"]
# Upstream's default retraction backup registers host memory with CUDA; the CPU engine has none.
CPU_DECODE = ["--disaggregation-decode-retraction-backup", "cpu_tensor"]
CONTEXT = ["--context-length", "10000000"]
REFUSED = "does not run under --disaggregation-mode decode"
BURSTS, PER_BURST, NEW_TOKENS = 3, 4, 8


def pd_phase(stage: Stage, timeout: float) -> dict[str, Any]:
    from kit_phases import LONG_CONTEXT, launch

    p, checks = stage.profile, stage.checks
    decode = [*DECODE, *(CPU_DECODE if p.device == "cpu" else []), *CONTEXT]
    record: dict[str, Any] = {"memory_before": stage.memory.reading()}
    try:
        server, start = launch(stage, "pd", [*p.segmented_args(), *decode],
                               LONG_CONTEXT, timeout)  # fmt: skip
    except RuntimeError as exc:
        record["segmented_refused"] = _refusal(str(exc))
        checks.add("pd: segmented refuses PD in one line naming the flag",
                   bool(record["segmented_refused"]), str(exc)[-2000:])  # fmt: skip
        record["auto"] = _auto(stage, decode, timeout)
        return record
    record["start"] = start
    try:
        record.update(_serve(stage, server))
    finally:
        server.stop()
        stage.servers.pop(server.name, None)
    return record


def _refusal(error: str) -> list[str]:
    return [line.strip() for line in error.splitlines() if REFUSED in line][:1]


def _auto(stage: Stage, decode: list[str], timeout: float) -> dict[str, Any]:
    """auto at the same context, where segmented refused PD: static if it fits, else a one-line
    refusal; either way, no traceback at start-up. Its log replaces the refused start's (the
    refusal is in the results): the device tool returns at most 8 files."""
    from kit_phases import LONG_CONTEXT, launch

    try:
        server, start = launch(stage, "pd", ["--kv-alloc-mode", "auto", *decode],
                               LONG_CONTEXT, timeout)  # fmt: skip
    except RuntimeError as exc:
        refused = [line for line in str(exc).splitlines() if "--kv-alloc-mode" in line]
        stage.checks.add("pd: auto refuses in one line", bool(refused), str(exc)[-2000:])
        return {"refused": refused[:1]}
    try:
        kv = start["kv_start"]
        outs = _bursts(server, bursts=1)
        stage.checks.add("pd: auto serves PD decode as static",
                         kv.get("mode") == "static" and _all_served(outs), kv)  # fmt: skip
        return {"kv_start": kv}
    finally:
        server.stop()
        stage.servers.pop(server.name, None)


def _serve(stage: Stage, server: KitServer) -> dict[str, Any]:
    p, checks = stage.profile, stage.checks
    kv = server.kv()
    checks.add("pd: segmented decode at 10M commits its KV on demand",
               kv.get("mode") == "segmented" and bool(kv.get("kv_on_demand"))
               and kv.get("effective_context_length") == 10_000_000, kv)  # fmt: skip
    started = time.monotonic()
    outs = _bursts(server, BURSTS)
    record: dict[str, Any] = {"bursts_s": round(time.monotonic() - started, 3)}
    loaded = server.kv().get("segments") or {}
    checks.add("pd: every request served", _all_served(outs))
    time.sleep(p.hold_off_s + (3 if p.device == "cpu" else 5))  # the idle policy's turn
    idle = server.kv().get("segments") or {}
    record.update(segments_loaded=loaded, segments_idle=idle,
                  memory_idle=stage.memory.reading([server]))  # fmt: skip
    checks.add("pd: segments committed as requests needed them, none inside an allocation",
               loaded.get("peak_committed_segments", 0) >= 2
               and loaded.get("mid_batch_commits") == 0, loaded)  # fmt: skip
    checks.add("pd: idle, every segment but the first given back",
               idle.get("committed_segments") == 1, idle)  # fmt: skip
    return record


def _bursts(server: KitServer, bursts: int) -> list[dict[str, Any]]:
    """``bursts`` bursts of requests at once, 200 to 3,200 prompt tokens each."""
    from sglang_kvalloc_harness.serving import fake_prefill_request

    outs: list[dict[str, Any]] = []
    with ThreadPoolExecutor(PER_BURST) as pool:
        for burst in range(bursts):
            payloads = [
                fake_prefill_request([5 + i, 6, 7, 8 + burst] * (200 * (i + 1)), 1000 * burst + i,
                                     NEW_TOKENS)
                for i in range(PER_BURST)
            ]  # fmt: skip
            outs.extend(pool.map(server.generate, payloads))
    return outs


def _all_served(outs: list[dict[str, Any]]) -> bool:
    return bool(outs) and all(
        (o.get("meta_info") or {}).get("completion_tokens") == NEW_TOKENS for o in outs
    )
