"""The kit's server phases: static, then segmented (both stay up), the benchmark between
them, their stops, then auto at a 10M context. Each returns its JSON-ready record and adds
checks; ``kit_run`` writes the results after every phase."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kit_bench
import kit_work
from kit_server import KitServer, Memory
from kit_work import Checks, Workload

STRICT_IDLE = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}
LONG_CONTEXT = {"SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN": "1"}


@dataclass
class Profile:
    """Everything that differs between the GPU run and its CPU proof."""

    name: str
    device: str
    common_args: list[str]
    fallback_args: list[list[str]]
    segment_tokens: int
    idle_cache_tokens: int
    hold_off_s: float
    auto_args: list[str]
    work: Workload
    start_timeout: float
    idle_timeout: float
    bench_loads: dict[str, dict[str, int]]
    bench_rounds: int
    pause_others: bool
    bench_warmup: bool = True
    hung_start_retries: int = 0
    kv_bytes_per_token: int = 0
    server_env: dict[str, str] = field(default_factory=dict)  # every server's, besides its own

    def segmented_args(self) -> list[str]:
        return [
            "--kv-alloc-mode", "segmented", "--kv-segment-tokens", str(self.segment_tokens),
            "--kv-segment-hold-off", str(self.hold_off_s),
            "--kv-idle-cache-tokens", str(self.idle_cache_tokens),
        ]  # fmt: skip


@dataclass
class Stage:
    """What the phases share: the model, the servers up, the outputs to compare."""

    profile: Profile
    model: Path
    out: Path
    memory: Memory
    checks: Checks
    extra_args: list[str] | None = None
    servers: dict[str, KitServer] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    baseline: dict[str, Any] = field(default_factory=dict)


def launch(
    stage: Stage, name: str, mode_args: list[str], env: dict[str, str], timeout: float
) -> tuple[KitServer, dict[str, Any]]:
    """Start a server; the first time, try the fallback argument sets in order and keep the
    first that starts. A start that hangs (its stacks are in the failure) is tried again up to
    ``hung_start_retries`` times; one that exits is not. Returns the server and its start's
    cost, failed tries included."""
    p = stage.profile
    tries = [stage.extra_args] if stage.extra_args is not None else p.fallback_args
    failures: list[dict[str, Any]] = []
    for extra in tries:
        for _attempt in range(1 + p.hung_start_retries):
            server = KitServer(
                name,
                stage.model,
                [*p.common_args, *extra, *mode_args],
                p.device,
                stage.out / f"server-{name}.log",
                env={**p.server_env, **env},
            )
            before = stage.memory.reading()
            try:
                seconds = server.start(timeout=timeout)
            except (RuntimeError, TimeoutError) as exc:
                server.stop()
                hung = isinstance(exc, TimeoutError)
                failures.append({"extra_args": extra, "hung": hung, "error": str(exc)[-12000:]})
                if hung:
                    continue
                break
            stage.extra_args = extra
            stage.servers[name] = server
            record = {
                "args": server.args,
                "start_seconds": round(seconds, 1),
                "failed_tries": failures,
                "memory_before": before,
                "memory_start": stage.memory.reading([server]),
                "kv_start": server.kv(),
            }
            return server, record
    raise RuntimeError(
        f"{name} server did not start:\n"
        + "\n".join(f"-- with {f['extra_args']}:\n{f['error']}" for f in failures)
    )


def _footprint(stage: Stage, name: str, record: dict[str, Any], key: str) -> int | None:
    """Device memory the server holds in a reading: per process (nvidia-smi), else the drop
    in the device's free memory since before its launch."""
    reading = record[key]
    own = reading.get(f"{name}_process_bytes")
    if own:
        return int(own)
    before = stage.memory.free_bytes(record["memory_before"])
    now = stage.memory.free_bytes(reading)
    return None if before is None or now is None else before - now


def static_phase(stage: Stage, timeout: float) -> dict[str, Any]:
    p = stage.profile
    server, record = launch(stage, "static", ["--kv-alloc-mode", "static"], {}, timeout)
    record["work"] = kit_work.run(server, p.work, stage.memory)
    record["memory_after_work"] = stage.memory.reading([server])
    kit_work.standard_checks(stage.checks, "static", record["work"], p.work)
    stage.checks.add("static: mode is static", record["kv_start"].get("mode") == "static")
    stage.outputs["static"] = record["work"]
    record["footprint_start_bytes"] = _footprint(stage, "static", record, "memory_start")
    if p.pause_others:
        server.pause()
    return record


def segmented_phase(stage: Stage, timeout: float) -> dict[str, Any]:
    p, checks = stage.profile, stage.checks
    server, record = launch(stage, "segmented", p.segmented_args(), STRICT_IDLE, timeout)
    kv0 = record["kv_start"]
    seg0 = kv0.get("segments") or {}
    record["work"] = work = kit_work.run(server, p.work, stage.memory)
    kit_work.standard_checks(checks, "segmented", work, p.work)
    record["tokens_vs_static"] = cmp = kit_work.compare(stage.outputs.get("static", {}), work)
    checks.add("segmented: sequential tokens equal static's", cmp["sequential"]["all_equal"], cmp)
    checks.add("segmented: prefix-hit tokens equal static's", cmp["prefix"]["all_equal"])
    # Concurrent batches may differ in composition between runs: reported, not required.
    checks.add("segmented: burst tokens equal static's", cmp["burst"]["all_equal"], strict=False)
    checks.add("segmented: mode is segmented", kv0.get("mode") == "segmented", kv0.get("reason"))

    # What the log said it committed at start is what /server_info says.
    log_mb = kit_work.log_committed_mb(server.log())
    seg_bytes = p.segment_tokens * p.kv_bytes_per_token
    committed0 = seg0.get("committed_bytes")
    record["start_commit"] = {"log_mb": log_mb, "server_info_bytes": committed0}
    checks.add(
        "segmented: committed at start is what the log says",
        log_mb is not None and committed0 is not None and abs(log_mb * 1e6 - committed0) < 1e4,
        record["start_commit"],
    )
    peak = max((kit_work.committed(s["kv"]) or 0 for s in work["busy_samples"]), default=0)
    longest = max(p.work.sequential + p.work.burst)
    record["peak_committed_bytes"] = peak
    checks.add(
        "segmented: requests spanned many segments",
        (kv := server.kv()).get("segments", {}).get("peak_committed_segments", 0)
        >= longest // p.segment_tokens,
        kv.get("segments"),
    )
    static_rec = stage.baseline.get("static", {})
    pool = (static_rec.get("kv_start") or {}).get("token_capacity", 0) * p.kv_bytes_per_token
    own = _footprint(stage, "segmented", record, "memory_start")
    record["footprint_start_bytes"] = own
    if (
        stage.profile.device == "cuda"
        and own is not None
        and static_rec.get("footprint_start_bytes")
    ):
        saving = static_rec["footprint_start_bytes"] - own
        record["start_saving_vs_static_bytes"] = saving
        checks.add(
            "segmented: holds less device memory at start than static (by most of the pool)",
            saving >= 0.8 * (pool - (committed0 or 0)),
            {"saving": saving, "static_pool_bytes": pool, "committed_at_start": committed0},
        )

    # Idle: the hold-off passes, the idle policy evicts and trailing segments go back.
    busy = stage.memory.reading([server])
    committed_busy = kit_work.committed(server.kv()) or 0
    limit = (committed0 or 0) + seg_bytes + p.idle_cache_tokens * p.kv_bytes_per_token
    record["idle"] = idle = kit_work.wait_idle(server, limit, p.idle_timeout)
    idle["memory"] = stage.memory.reading([server])
    idle["memory_busy"] = busy
    idle["committed_busy_bytes"] = committed_busy
    committed_idle = kit_work.committed(idle["kv"]) or 0
    checks.add(
        "segmented: committed memory given back when idle",
        committed_idle <= limit and peak > committed_idle,
        {"peak": peak, "idle": committed_idle, "limit": limit, "seconds": idle["seconds"]},
    )
    if p.device == "cuda":
        free_busy = stage.memory.free_bytes(busy)
        free_idle = stage.memory.free_bytes(idle["memory"])
        released = committed_busy - committed_idle
        if free_busy is not None and free_idle is not None:
            idle["device_free_gain_bytes"] = free_idle - free_busy
            checks.add(
                "segmented: the device's free memory rises when idle",
                free_idle - free_busy >= 0.5 * released - seg_bytes,
                {"free_gain": free_idle - free_busy, "released_by_server_info": released},
            )
    log = server.log()
    checks.add(
        "segmented: no leak found by upstream's strict idle check",
        "memory leak detected" not in log,
    )
    checks.add("segmented: server alive after idle", server.alive())
    record["log_lines"] = [
        line for line in log.splitlines() if "egment" in line and "server_args" not in line
    ][:16]
    stage.outputs["segmented"] = work
    if p.pause_others:
        server.pause()
    return record


def bench_phase(stage: Stage, budget_s: float) -> dict[str, Any]:
    p = stage.profile
    servers = {m: stage.servers[m] for m in ("static", "segmented")}

    def partial(data: dict[str, Any]) -> None:
        stage.baseline["bench_partial"] = data

    return kit_bench.compare(
        servers,
        stage.model,
        p.bench_loads,
        budget_s,
        p.bench_rounds,
        p.pause_others,
        partial,
        warmup=p.bench_warmup,
    )


def stop_phase(stage: Stage) -> dict[str, Any]:
    """Stop segmented, then static; the device's free memory after each."""
    record: dict[str, Any] = {}
    for name in ("segmented", "static"):
        server = stage.servers.pop(name, None)
        if server is None:
            continue
        server.stop()
        time.sleep(2 if stage.profile.device == "cuda" else 0)
        record[name] = stage.memory.reading()
    if stage.profile.device == "cuda" and "static" in record:
        first = stage.baseline.get("static", {}).get("memory_before", {})
        before, after = stage.memory.free_bytes(first), stage.memory.free_bytes(record["static"])
        if before is not None and after is not None:
            record["free_vs_before_static_bytes"] = after - before
            stage.checks.add(
                "all servers stopped: the device's free memory is back",
                after - before >= -512 * (1 << 20),
                after - before,
            )
    return record


def auto_phase(stage: Stage, timeout: float) -> dict[str, Any]:
    """``--kv-alloc-mode auto --context-length 10000000`` with upstream's override, as a user
    types it (upstream's default pool); sequential and prefix requests against static's."""
    p = stage.profile
    args = ["--kv-alloc-mode", "auto", "--context-length", "10000000", *p.auto_args]
    server, record = launch(stage, "auto", args, LONG_CONTEXT, timeout)
    try:
        kv = record["kv_start"]
        prompts = p.work.prompts()
        outs = [kit_work.greedy(server, ids, p.work.new_tokens) for ids in prompts["sequential"]]
        record["sequential"] = [o.get("output_ids") for o in outs]
        ref = [r["output_ids"] for r in stage.outputs.get("static", {}).get("sequential", [])]
        record["kv_after"] = server.kv()
        record["log_lines"] = [
            line
            for line in server.log().splitlines()
            if ("auto" in line or "KV allocation" in line or "egment" in line)
            and "server_args" not in line
        ][:16]
        stage.checks.add(
            "auto: chose a mode and an effective context",
            kv.get("mode") in ("static", "segmented") and kv.get("effective_context_length"),
            {
                k: kv.get(k)
                for k in ("mode", "reason", "effective_context_length", "token_capacity")
            },
        )
        stage.checks.add("auto: tokens equal static's", record["sequential"] == ref)
    finally:
        server.stop()
        stage.servers.pop("auto", None)
        time.sleep(2 if p.device == "cuda" else 0)
        record["memory_after_stop"] = stage.memory.reading()
    return record


def rl_phase(stage: Stage) -> dict[str, Any]:
    """RL's release and resume of memory occupation on the segmented server (issue 35):
    committed bytes 0 and the device's free memory back after release, nothing committed by
    resume, and the first request after it equal to static's."""
    server, checks = stage.servers["segmented"], stage.checks
    server.resume()  # paused between phases on the CPU proof
    try:
        return _release_and_resume(stage, server, checks)
    finally:
        if stage.profile.pause_others:
            server.pause()


def _release_and_resume(stage: Stage, server: KitServer, checks: Checks) -> dict[str, Any]:
    from sglang_kvalloc_harness.serving import http_json

    tags = {"tags": ["kv_cache"]}
    before = stage.memory.reading([server])
    committed = kit_work.committed(server.kv()) or 0
    started = time.monotonic()
    http_json(server.url + "/release_memory_occupation", tags, timeout=120)
    record: dict[str, Any] = {"release_s": round(time.monotonic() - started, 3)}
    released = stage.memory.reading([server])
    record.update(committed_before=committed, memory_before=before, memory_released=released,
                  committed_released=kit_work.committed(server.kv()))  # fmt: skip
    checks.add("rl: release leaves nothing committed", record["committed_released"] == 0)
    freed = None
    if stage.memory.free_bytes(before) is not None:
        freed = stage.memory.free_bytes(released) - stage.memory.free_bytes(before)
        record["device_free_gain_bytes"] = freed
        checks.add("rl: the device's free memory grows by what was committed",
                   freed >= 0.9 * committed, {"freed": freed, "committed": committed})  # fmt: skip
    started = time.monotonic()
    http_json(server.url + "/resume_memory_occupation", tags, timeout=120)
    record["resume_s"] = round(time.monotonic() - started, 3)
    checks.add("rl: resume commits nothing", kit_work.committed(server.kv()) == 0)
    first = stage.profile.work.prompts()["sequential"][0]
    started = time.monotonic()
    out = kit_work.greedy(server, first, stage.profile.work.new_tokens)
    record["first_request_s"] = round(time.monotonic() - started, 3)
    static = stage.outputs.get("static", {}).get("sequential", [{}])[0].get("output_ids")
    checks.add("rl: the first request after resume equals static's",
               static is not None and out.get("output_ids") == static)  # fmt: skip
    return record
