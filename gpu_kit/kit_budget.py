"""The kit's budget phase (issue 37): two segmented servers on one KV budget, started together,
on one device. The first serves the longest sequential prompt and keeps its KV cached; the
second's long request waits until the first gives way; tokens equal static's; the ledger,
sampled throughout, never holds more than its total; each server's committed KV equals its
row. On CUDA the device's free memory is read with the driver at each step."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kit_work

if TYPE_CHECKING:
    from kit_phases import Stage
    from kit_server import KitServer

GAVE_WAY = "Another server waits on the KV budget: evicted"


def budget_bytes(stage: Stage, long_tokens: int) -> int:
    """Room for one long request beside what the other server retains (its idle cache and a
    segment either side), not for two long requests."""
    p = stage.profile
    tokens = long_tokens + p.work.new_tokens + p.idle_cache_tokens + 2 * p.segment_tokens
    return tokens * p.kv_bytes_per_token


def budget_phase(stage: Stage, timeout: float) -> dict[str, Any]:
    from kit_phases import launch

    p, checks = stage.profile, stage.checks
    long_prompt = p.work.prompts()["sequential"][-1]
    total = budget_bytes(stage, len(long_prompt))
    name = f"kit-{int(time.time())}"
    args = [*p.segmented_args(), "--kv-budget", name, "--kv-budget-bytes", str(total)]
    record: dict[str, Any] = {"budget_bytes": total, "memory_before": stage.memory.reading()}
    with ThreadPoolExecutor(2) as pool:  # started together: both must start
        futures = [pool.submit(launch, stage, f"budget_{i}", args, {}, timeout) for i in (0, 1)]
        starts = [f.result() for f in futures]
    first, second = (server for server, _ in starts)
    record["starts"] = [{"start_seconds": r["start_seconds"]} for _, r in starts]
    try:
        start_committed = kit_work.committed(starts[0][1]["kv_start"]) or 0
        record.update(_share(stage, first, second, long_prompt, total, start_committed))
    finally:
        for server in (first, second):
            server.stop()
            stage.servers.pop(server.name, None)
        time.sleep(2 if p.device == "cuda" else 0)
        record["memory_after_stop"] = stage.memory.reading()
    checks.add("budget: two servers started together both started", len(starts) == 2)
    return record


def _share(
    stage: Stage,
    first: KitServer,
    second: KitServer,
    long_prompt: list[int],
    total: int,
    start_committed: int,
) -> dict[str, Any]:
    from sglang_kvalloc.in_tree_finder import standalone

    read_ledger = standalone("sglang.srt.mem_cache.segmented.shared_budget").read_ledger

    p, checks, memory = stage.profile, stage.checks, stage.memory
    path = Path(first.kv()["budget"]["path"])
    over: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            ledger, _ = read_ledger(path)
            if ledger.committed() > ledger.total:
                over.append(ledger.committed())
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    record: dict[str, Any] = {"ledger": str(path)}
    try:
        ledger, dead = read_ledger(path)
        checks.add("budget: one ledger, two rows, its total",
                   len(ledger.slots) == 2 and not dead and ledger.total == total)  # fmt: skip
        static = stage.outputs.get("static", {}).get("sequential", [{}])[-1].get("output_ids")
        readings = {"started": memory.reading([first, second])}
        out_first = kit_work.greedy(first, long_prompt, p.work.new_tokens)
        readings["first_served"] = memory.reading([first, second])
        held = kit_work.committed(first.kv()) or 0
        started = time.monotonic()
        out_second = kit_work.greedy(second, long_prompt[::-1], p.work.new_tokens)
        record["second_waited_s"] = round(time.monotonic() - started, 3)
        readings["second_served"] = memory.reading([first, second])
        record["readings"] = readings
        checks.add("budget: the first's tokens equal static's",
                   static is not None and out_first.get("output_ids") == static)  # fmt: skip
        checks.add("budget: the second was served", len(out_second.get("output_ids") or []) > 0)
        checks.add("budget: the first gave way", GAVE_WAY in first.log()
                   and (kit_work.committed(first.kv()) or 0) < held)  # fmt: skip
        ledger, _ = read_ledger(path)
        rows = {slot.pid: slot.committed for slot in ledger.slots}
        for server in (first, second):
            row = next((rows[pid] for pid in server.pids() if pid in rows), None)
            checks.add(f"budget: {server.name}'s committed KV is its row",
                       row == kit_work.committed(server.kv()), {"row": row})  # fmt: skip
        before, after = (memory.free_bytes(readings[k]) for k in ("started", "first_served"))
        if before is not None and after is not None:
            grown = held - start_committed
            record["first_free_drop_bytes"] = before - after
            checks.add("budget: the device's free memory fell by what the first committed",
                       before - after >= 0.9 * grown, {"drop": before - after,
                       "committed": grown}, strict=False)  # fmt: skip
    finally:
        stop.set()
        sampler.join(timeout=5)
    checks.add("budget: the ledger never held more than its total", over == [], over[:5])
    return record
