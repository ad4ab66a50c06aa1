"""Benchmark --kv-alloc-mode static vs segmented on the built-in tiny model (CPU engine).

One run measures, side by side:

1. start-up: for each context length and mode, the time from launch to /health OK, the
   resident memory of all the server's processes after start-up, and whether it started at all
   (with the exit code and error line when it did not);
2. throughput at one or more contexts: prefill and decode tokens/s, static and segmented
   measured alternately over several rounds (the idle server is paused with SIGSTOP so its
   busy-polling scheduler does not steal a core), medians and segmented/static ratios;
3. the cost of committing and releasing one segment, in process, with the core classes.

It writes DIR/benchmark.json (every raw number), DIR/benchmark.md and DIR/benchmark.png.

    python benchmark/bench_kv_alloc.py --out docs/runs/
    # re-render only:
    python benchmark/bench_kv_alloc.py --out docs/runs/ --from-json docs/runs/benchmark.json
"""

from __future__ import annotations

import argparse
import atexit
import concurrent.futures
import json
import os
import random
import re
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import provenance  # noqa: E402

from sglang_kvalloc_harness.serving import LocalServer  # noqa: E402
from sglang_kvalloc_harness.tiny_model import ensure as ensure_tiny_model  # noqa: E402

MODES = ("static", "segmented")
DEFAULT_CONTEXTS = (2048, 131072, 1_000_000, 10_000_000)
DEFAULT_THROUGHPUT_CONTEXTS = (2048, 131072)
OVERRIDE_ENV = {"SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN": "1"}
TINY_MODEL_MAX_CONTEXT = 65536

_LIVE: list[LocalServer] = []


def _stop_all() -> None:
    for server in list(_LIVE):
        try:
            server.stop()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
        _LIVE.remove(server)


atexit.register(_stop_all)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- servers ------------------------------------------------------------------------------


# Segmented servers get this hold-off (--segment-hold-off). The default keeps segments
# committed across the pauses between rounds, so the throughput ratio is the steady state;
# a short hold-off adds the cost of committing segments again after each pause.
SEGMENT_HOLD_OFF_S = 600.0


def server_args(mode: str, context: int, max_total_tokens: int) -> list[str]:
    args = [
        "--dtype",
        "float32",
        "--max-total-tokens",
        str(max_total_tokens),
        "--kv-alloc-mode",
        mode,
        "--context-length",
        str(context),
    ]
    if mode == "segmented":
        args += ["--kv-segment-hold-off", str(SEGMENT_HOLD_OFF_S)]
    return args


def make_server(model: Path, mode: str, context: int, max_total_tokens: int) -> LocalServer:
    env = dict(OVERRIDE_ENV) if context > TINY_MODEL_MAX_CONTEXT else {}
    return LocalServer(model, args=server_args(mode, context, max_total_tokens), env=env)


def _stop(server: LocalServer) -> None:
    server.stop()
    if server in _LIVE:
        _LIVE.remove(server)


class ForeignCpu:
    """CPU seconds used on the machine by processes other than this benchmark and its servers.

    The machine may be shared; a measurement during which others used a noticeable share of the
    2 cores is flagged (and, for throughput, redone).
    """

    def __init__(self, servers: list[LocalServer]) -> None:
        self.servers = servers

    @staticmethod
    def _busy() -> float:
        import psutil

        t = psutil.cpu_times()
        # guest time is already in user; steal is the hypervisor's, not a process here.
        return sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq"))

    def _mine(self) -> float:
        import psutil

        pids = {os.getpid()}
        for server in self.servers:
            try:
                pids.update(server.pids())
            except Exception:  # noqa: BLE001 - a server may be exiting
                pass
        total = 0.0
        for pid in pids:
            try:
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
            except psutil.Error:
                continue
        return total

    def __enter__(self) -> ForeignCpu:
        self._t0 = time.perf_counter()
        self._busy0, self._mine0 = self._busy(), self._mine()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self._t0
        busy = self._busy() - self._busy0
        mine = self._mine() - self._mine0
        self.foreign_cpu_s = max(0.0, busy - mine)
        # Average number of cores the others kept busy during the measurement.
        self.foreign_cores = self.foreign_cpu_s / self.wall_s if self.wall_s > 0 else 0.0


def wait_quiet(servers: list[LocalServer], limit: float, max_wait: float) -> float:
    """Wait (up to max_wait s) until processes outside the benchmark use < limit cores over a
    2 s window; returns the seconds waited. A shared machine otherwise skews single samples."""
    t0 = time.monotonic()
    while True:
        with ForeignCpu(servers) as f:
            time.sleep(2.0)
        waited = time.monotonic() - t0
        if f.foreign_cores < limit or waited >= max_wait:
            if waited > 2.5:
                log(
                    f"waited {waited:.0f}s for other processes to go quiet "
                    f"(now {f.foreign_cores:.2f} cores)"
                )
            return waited


def rss_by_process(server: LocalServer) -> dict[str, int]:
    import psutil

    out: dict[str, int] = {}
    for pid in server.pids():
        try:
            p = psutil.Process(pid)
            name = p.name()
            if name == "python" or name.startswith("python"):
                cmd = p.cmdline()
                name = (
                    "launcher (tokenizer manager, HTTP)"
                    if pid == server.proc.pid
                    else ("helper " + " ".join(cmd[1:3]))
                )
            out[f"{name} [{pid}]"] = p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return out


def kv_alloc_info(server: LocalServer) -> dict[str, Any]:
    info = server.server_info()
    states = info.get("internal_states") or [{}]
    return {
        "kv_alloc": states[0].get("kv_alloc"),
        "max_total_num_tokens": info.get("max_total_num_tokens"),
        "max_running_requests_arg": info.get("max_running_requests"),
        "page_size": info.get("page_size"),
        "attention_backend": info.get("attention_backend"),
        "chunked_prefill_size": info.get("chunked_prefill_size"),
    }


_LOG_PATTERNS = ("KV allocation mode:", "Segmented KV pool:", "Segmented req_to_token:")


def interesting_log_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if any(p in line for p in _LOG_PATTERNS)]


def failure_line(text: str) -> str:
    """The most telling error line of a start-up log: the last exception message."""
    lines = [ln.strip() for ln in text.splitlines()]
    pat = re.compile(r"^[A-Za-z_.]*(Error|Exception|Killed)\b.*:|out of memory|OutOfMemory", re.I)
    hits = [ln for ln in lines if pat.search(ln) and not ln.startswith("File ")]
    if hits:
        return hits[-1]
    tail = [ln for ln in lines if ln]
    return tail[-1] if tail else "(empty log)"


def start_and_measure(
    model: Path,
    mode: str,
    context: int,
    max_total_tokens: int,
    settle_s: float,
    timeout: float,
    cfg: argparse.Namespace,
) -> tuple[dict[str, Any], LocalServer | None]:
    waited = wait_quiet([], cfg.foreign_limit, cfg.quiet_wait)
    server = make_server(model, mode, context, max_total_tokens)
    rec: dict[str, Any] = {
        "context": context,
        "mode": mode,
        "command": shlex.join(server.command()[2:]),  # without the interpreter
        "env": server.env,
        "waited_for_quiet_s": round(waited, 1),
    }
    import psutil

    rec["memory_available_before_bytes"] = psutil.virtual_memory().available
    foreign = ForeignCpu([])  # the server's pids are gone by the end if it fails: counted below
    t0 = time.monotonic()
    try:
        _LIVE.append(server)
        foreign.servers = [server]
        with foreign:
            server.start(timeout=timeout)
    except (RuntimeError, TimeoutError) as exc:
        elapsed = time.monotonic() - t0
        rc = server.proc.returncode if server.proc is not None else None
        text = server.log()
        _stop(server)
        rec.update(
            started=False,
            failed_after_s=round(elapsed, 2),
            exit_code=rc,
            error_line=failure_line(text),
            timeout=isinstance(exc, TimeoutError),
            log_lines=interesting_log_lines(text),
            log_path=str(server.log_path),
        )
        log(
            f"{mode:9s} ctx={context:>8d}: FAILED after {elapsed:.1f}s rc={rc}: "
            f"{rec['error_line'][:160]}"
        )
        return rec, None
    startup = time.monotonic() - t0
    rec["foreign_cores_during_startup"] = round(foreign.foreign_cores, 3)
    time.sleep(settle_s)
    samples = []
    for _ in range(3):
        samples.append(server.rss_bytes())
        time.sleep(0.5)
    info = kv_alloc_info(server)
    rec.update(
        started=True,
        startup_s=round(startup, 2),
        rss_bytes=max(samples),
        rss_samples=samples,
        rss_by_process=rss_by_process(server),
        **info,
        log_lines=interesting_log_lines(server.log()),
        log_path=str(server.log_path),
    )
    log(f"{mode:9s} ctx={context:>8d}: started in {startup:.1f}s, RSS {max(samples) / 1e9:.2f} GB")
    return rec, server


# -- load generation ------------------------------------------------------------------------


def random_prompts(seed: int, n: int, length: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    # ids 3.. avoid the special tokens (bos=0, eos=1, pad=2).
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


def run_batch(
    server: LocalServer, prompts: list[list[int]], sampling: dict[str, Any]
) -> tuple[float, list[dict[str, Any]]]:
    """Send all prompts at once (one thread each); wall time from first send to last answer."""
    payloads = [{"input_ids": p, "sampling_params": sampling} for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(payloads)) as pool:
        t0 = time.perf_counter()
        results = list(pool.map(server.generate, payloads))
        wall = time.perf_counter() - t0
    return wall, [r["meta_info"] for r in results]


def measure_prefill(
    server: LocalServer, seed: int, cfg: argparse.Namespace, vocab: int
) -> dict[str, Any]:
    tokens = 0
    wall = 0.0
    cached = 0
    for b in range(cfg.prefill_batches):
        prompts = random_prompts(seed * 1000 + b, cfg.batch, cfg.prefill_len, vocab)
        w, metas = run_batch(server, prompts, {"max_new_tokens": 1, "temperature": 0.0})
        wall += w
        tokens += sum(m["prompt_tokens"] for m in metas)
        cached += sum(m.get("cached_tokens") or 0 for m in metas)
    return {
        "prompt_tokens": tokens,
        "cached_tokens": cached,
        "wall_s": wall,
        "tokens_per_s": (tokens - cached) / wall,
    }


def measure_decode(
    server: LocalServer, seed: int, cfg: argparse.Namespace, vocab: int
) -> dict[str, Any]:
    prompts = random_prompts(seed * 1000 + 999, cfg.batch, cfg.decode_prompt_len, vocab)
    sampling = {"max_new_tokens": cfg.decode_tokens, "temperature": 0.0, "ignore_eos": True}
    wall, metas = run_batch(server, prompts, sampling)
    out_tokens = sum(m["completion_tokens"] for m in metas)
    return {
        "completion_tokens": out_tokens,
        "wall_s": wall,
        "tokens_per_s": out_tokens / wall,
        "expected_tokens": cfg.batch * cfg.decode_tokens,
    }


def throughput_at(model: Path, context: int, cfg: argparse.Namespace, vocab: int) -> dict[str, Any]:
    servers: dict[str, LocalServer] = {}
    starts: dict[str, Any] = {}
    try:
        for mode in MODES:
            rec, server = start_and_measure(
                model, mode, context, cfg.max_total_tokens, 0.0, cfg.start_timeout, cfg
            )
            starts[mode] = {k: rec.get(k) for k in ("started", "startup_s", "error_line")}
            if server is None:
                return {"context": context, "skipped": f"{mode} did not start", "starts": starts}
            servers[mode] = server
            server.pause()
        # Warm-up (untimed): first requests pay lazy initialisation.
        for mode in MODES:
            servers[mode].resume()
            time.sleep(0.3)
            for k in range(2):
                measure_prefill(servers[mode], 10_000 + k, cfg, vocab)
                measure_decode(servers[mode], 10_000 + k, cfg, vocab)
            servers[mode].pause()
        rounds: list[dict[str, Any]] = []
        for r in range(cfg.rounds):
            order = MODES if r % 2 == 0 else MODES[::-1]
            for mode in order:
                server = servers[mode]
                server.resume()
                time.sleep(0.3)
                # Both modes get the same prompts in a round, new prompts every round (and every
                # retry), so the radix cache never hits.
                rejected: list[dict[str, Any]] = []
                for attempt in range(cfg.max_retries + 1):
                    seed = (r + 1) * 10 + attempt
                    waited = wait_quiet(list(servers.values()), cfg.foreign_limit, 60.0)
                    with ForeignCpu(list(servers.values())) as fpre:
                        pre = measure_prefill(server, seed, cfg, vocab)
                    with ForeignCpu(list(servers.values())) as fdec:
                        dec = measure_decode(server, seed, cfg, vocab)
                    pre["waited_for_quiet_s"] = round(waited, 1)
                    pre["foreign_cores"] = round(fpre.foreign_cores, 3)
                    dec["foreign_cores"] = round(fdec.foreign_cores, 3)
                    noisy = max(fpre.foreign_cores, fdec.foreign_cores) > cfg.foreign_limit
                    log(
                        f"ctx={context} round {r} {mode:9s}: prefill {pre['tokens_per_s']:8.0f} "
                        f"tok/s, decode {dec['tokens_per_s']:6.1f} tok/s (other processes: "
                        f"{fpre.foreign_cores:.2f}/{fdec.foreign_cores:.2f} cores)"
                        + (" -> redo" if noisy and attempt < cfg.max_retries else "")
                    )
                    if not noisy or attempt == cfg.max_retries:
                        break
                    rejected.append({"prefill": pre, "decode": dec})
                    time.sleep(cfg.retry_wait)
                server.pause()
                rounds.append(
                    {
                        "round": r,
                        "mode": mode,
                        "prefill": pre,
                        "decode": dec,
                        "noisy": noisy,
                        "rejected_attempts": rejected,
                    }
                )
        after: dict[str, Any] = {}
        for mode in MODES:
            servers[mode].resume()
            time.sleep(0.3)
            after[mode] = {
                "rss_bytes": servers[mode].rss_bytes(),
                **kv_alloc_info(servers[mode]),
            }
            servers[mode].pause()
    finally:
        for server in servers.values():
            _stop(server)
    med: dict[str, dict[str, float]] = {}
    for mode in MODES:
        mine = [x for x in rounds if x["mode"] == mode]
        med[mode] = {
            "prefill_tokens_per_s": statistics.median(x["prefill"]["tokens_per_s"] for x in mine),
            "decode_tokens_per_s": statistics.median(x["decode"]["tokens_per_s"] for x in mine),
        }
    # Per-round ratios too: they show how much of the spread is noise common to both modes.
    per_round = []
    for r in range(cfg.rounds):
        s = next(x for x in rounds if x["round"] == r and x["mode"] == "static")
        g = next(x for x in rounds if x["round"] == r and x["mode"] == "segmented")
        per_round.append(
            {
                "round": r,
                "prefill": g["prefill"]["tokens_per_s"] / s["prefill"]["tokens_per_s"],
                "decode": g["decode"]["tokens_per_s"] / s["decode"]["tokens_per_s"],
            }
        )
    ratio = {
        "prefill": med["segmented"]["prefill_tokens_per_s"] / med["static"]["prefill_tokens_per_s"],
        "decode": med["segmented"]["decode_tokens_per_s"] / med["static"]["decode_tokens_per_s"],
    }
    return {
        "context": context,
        "starts": starts,
        "rounds": rounds,
        "median": med,
        "ratio_segmented_over_static": ratio,
        "per_round_ratio": per_round,
        "after": after,
    }


# -- segment commit cost (in process) -------------------------------------------------------


def segment_cost(
    name: str,
    geometry_args: dict[str, Any],
    row_bytes: list[int],
    granularity: int | None,
    reps: int,
) -> dict[str, Any]:
    from sglang_kvalloc.core.segments import SegmentedBuffers, SegmentGeometry

    geometry = SegmentGeometry(**geometry_args)
    bufs = SegmentedBuffers.create(geometry, row_bytes, device="cpu", granularity=granularity)
    seg_bytes = sum(rb * geometry.segment_tokens for rb in row_bytes)
    commit_s: list[float] = []
    release_s: list[float] = []
    try:
        for i in range(reps):
            seg = 1 + i % (geometry.num_segments - 1)
            t0 = time.perf_counter()
            bufs.commit_segment(seg)
            t1 = time.perf_counter()
            bufs.release_segment(seg)
            t2 = time.perf_counter()
            commit_s.append(t1 - t0)
            release_s.append(t2 - t1)
        populate = getattr(bufs.backings[0], "uses_populate_write", None)
    finally:
        bufs.close()
    c = statistics.median(commit_s)
    return {
        "name": name,
        "buffers": len(row_bytes),
        "row_bytes": sorted(set(row_bytes)),
        "segment_tokens": geometry.segment_tokens,
        "segment_bytes_total": seg_bytes,
        "bytes_per_buffer": seg_bytes // len(row_bytes),
        "granularity": granularity,
        "repetitions": reps,
        "commit_median_s": c,
        "release_median_s": statistics.median(release_s),
        "commit_p90_s": sorted(commit_s)[int(0.9 * (reps - 1))],
        "release_p90_s": sorted(release_s)[int(0.9 * (reps - 1))],
        "commit_gb_per_s": seg_bytes / c / 1e9,
        "uses_madv_populate_write": populate,
        "commit_s": commit_s,
        "release_s": release_s,
    }


def segment_costs(model: Path, seg_info: dict[str, Any] | None, reps: int) -> list[dict[str, Any]]:
    cfg = json.loads((model / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_row = cfg["num_key_value_heads"] * head_dim * 4  # float32 K (and V) bytes per token
    layers = cfg["num_hidden_layers"]
    seg_tokens = (seg_info or {}).get("segment_tokens", 4096)
    num_segments = (seg_info or {}).get("total_segments", 17)
    out = [
        segment_cost(
            f"tiny model pool ({2 * layers} buffers x {seg_tokens * kv_row // 1024} KB)",
            {"cap_tokens": seg_tokens * num_segments, "segment_tokens": seg_tokens, "page_size": 1},
            [kv_row] * (2 * layers),
            None,
            reps,
        )
    ]
    # GPU-like: 64 buffers (K and V of 32 layers), 2 MB each per segment, 2 MB granularity.
    gpu_tokens = 4096
    out.append(
        segment_cost(
            "GPU-like (64 buffers x 2 MB)",
            {"cap_tokens": gpu_tokens * 8, "segment_tokens": gpu_tokens, "page_size": 1},
            [2 * 1024 * 1024 // gpu_tokens] * 64,
            2 * 1024 * 1024,
            max(10, reps // 2),
        )
    )
    return out


# -- machine ----------------------------------------------------------------------------------


# machine_info and git_state: benchmark/provenance.py (one record for every benchmark).


# -- report ----------------------------------------------------------------------------------


def _gb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def _ctx(n: int) -> str:
    from plot import context_label  # one label format for the table and the plot

    return context_label(n)


def findings(data: dict[str, Any]) -> list[str]:
    """Plain statements computed from the numbers (no judgement beyond the 0.99 target)."""
    out: list[str] = []
    by = {(r["context"], r["mode"]): r for r in data["startup"]}
    for mode in MODES:
        cells = []
        for ctx in sorted({c for c, _ in by}):
            r = by.get((ctx, mode))
            if r is None:
                continue
            cells.append(
                f"{_ctx(ctx)} {_gb(r['rss_bytes'])} GB"
                if r["started"]
                else f"{_ctx(ctx)} failed to start (exit code {r['exit_code']})"
            )
        out.append(f"RSS after start-up, {mode}: " + ", ".join(cells) + ".")
    seg = [by[k] for k in sorted(by) if k[1] == "segmented" and by[k]["started"]]
    if len(seg) >= 2:
        lo, hi = seg[0], seg[-1]
        sched = lambda r: sum(v for k, v in r["rss_by_process"].items() if "scheduler" in k)  # noqa: E731
        extra = sched(hi) - sched(lo)
        per_pos = extra / (hi["context"] - lo["context"])
        if abs(extra) > 50e6:
            out.append(
                f"Segmented RSS is not flat in the context: the scheduler holds "
                f"{extra / 1e6:.0f} MB more at {_ctx(hi['context'])} than at "
                f"{_ctx(lo['context'])} (about {per_pos:.0f} bytes per context position)."
            )
        else:
            out.append(
                f"Segmented RSS is flat in the context: the scheduler holds {extra / 1e6:+.0f} MB "
                f"at {_ctx(hi['context'])} against {_ctx(lo['context'])}."
            )
    for tp in data["throughput"]:
        if "ratio_segmented_over_static" not in tp:
            continue
        r = tp["ratio_segmented_over_static"]
        verdict = ", ".join(
            f"{ph} {r[ph]:.3f} ({'meets' if r[ph] >= 0.99 else 'below'} the 0.99 target)"
            for ph in ("prefill", "decode")
        )
        spread = {
            ph: (
                min(x[ph] for x in tp["per_round_ratio"]),
                max(x[ph] for x in tp["per_round_ratio"]),
            )
            for ph in ("prefill", "decode")
        }
        out.append(
            f"Throughput at {_ctx(tp['context'])}, segmented/static medians: {verdict}; "
            f"per-round ratios span {spread['prefill'][0]:.2f}-{spread['prefill'][1]:.2f} "
            f"(prefill) and {spread['decode'][0]:.2f}-{spread['decode'][1]:.2f} (decode)."
        )
    return out


def render_md(data: dict[str, Any]) -> str:
    m = data["machine"]
    s = data["settings"]
    lines: list[str] = []
    add = lines.append
    add("# Benchmark: `--kv-alloc-mode static` vs `segmented`")
    add("")
    add(
        "**No GPU was used.** Every number below comes from SGLang's CPU engine "
        "(`SGLANG_USE_CPU_ENGINE=1`, `--device cpu`) serving the built-in tiny Llama "
        "(2 layers, hidden 64, 2 KV heads of dim 16, float32, random weights). They show what "
        "the allocation mode changes in memory and start-up, and whether segmented mode costs "
        "serving speed on this engine; they say nothing about GPU speed, where segments are "
        "committed with the CUDA VMM driver calls instead of `madvise` (that backing's own "
        "suite ran on lent H100s, each run listed in gpu.md with what it covered)."
    )
    add("")
    add("## Findings in this run")
    add("")
    for line in findings(data):
        add(f"- {line}")
    add("")
    add("## Machine")
    add("")
    add(
        f"- {m['logical_cpus']} cores ({m['cpu_model']}), "
        f"{m['memory_total_bytes'] / 2**30:.0f} GB RAM ({m['memory_total_bytes'] / 1e9:.1f} GB), "
        f"swap {m['swap_total_bytes'] / 1e9:.0f} GB, no GPU"
    )
    add(
        f"- Linux {m['kernel']}, `vm.overcommit_memory={m['vm_overcommit_memory']}`, "
        f"Python {m['python']}, torch {m['torch']}, SGLang {m['sglang']}"
    )
    add(f"- run on {data['started_at']}, took {data['duration_s'] / 60:.1f} minutes")
    add("")
    add("## Command")
    add("")
    add("```sh")
    add(data["command"])
    add("```")
    add("")
    add(
        "Each server is `python -m sglang.launch_server --model-path <tiny model> --device cpu "
        f"--dtype float32 --max-total-tokens {s['max_total_tokens']} --kv-alloc-mode MODE "
        "--context-length N` (segmented ones also with `--kv-segment-hold-off "
        f"{s.get('segment_hold_off', 5.0):g}`), started and stopped with "
        "`sglang_kvalloc_harness.serving.LocalServer` "
        "(own process group, killed as a group). Contexts above the tiny model's 65,536 need "
        "`SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1`, which is set for them. "
        f"`--max-total-tokens {s['max_total_tokens']}` keeps the KV pool at the same "
        f"{s['max_total_tokens']} tokens (about 32 MB) in both modes, so the differences below "
        "come from what scales with the context: upstream's `req_to_token` table, "
        "(max running requests + 1) x context x int32, zero-filled at start in static mode and "
        "a reservation committed only where requests write in segmented mode."
    )
    add("")
    add("## 1. Start-up and resident memory")
    add("")
    add(
        "Start-up is launch to the first `/health` 200 (one launch per cell, so a second or two "
        "of noise). RSS is summed over the server's processes (launcher with the tokenizer "
        "manager, scheduler, detokenizer, helper) after start-up; the scheduler alone is in "
        "its own column. The machine may be shared: before each launch the benchmark waits "
        f"(up to {s.get('quiet_wait', 0):.0f} s) until processes outside it use less than "
        f'{s["foreign_limit"]} cores, and "other load" is the average number of cores such '
        "processes still kept busy during the start-up; start-up times with a high value there "
        "are inflated."
    )
    add("")
    add(
        "| context | mode | started | start-up (s) | RSS all processes (GB) | scheduler RSS (GB) "
        "| max running req. | req_to_token at start | other load (cores) |"
    )
    add("|---:|---|---|---:|---:|---:|---:|---|---:|")
    for rec in data["startup"]:
        ctx = _ctx(rec["context"])
        if rec["started"]:
            kv = rec.get("kv_alloc") or {}
            sched = sum(v for k, v in rec["rss_by_process"].items() if "scheduler" in k)
            r2t = kv.get("req_to_token_bytes")
            if rec["mode"] == "segmented":
                seg = kv.get("segments") or {}
                r2t_s = (
                    f"{_gb(r2t)} GB reserved, "
                    f"{(seg.get('req_to_token_resident_bytes') or 0) / 1e6:.1f} MB resident"
                )
            else:
                r2t_s = f"{_gb(r2t)} GB allocated"
            add(
                f"| {ctx} | {rec['mode']} | yes | {rec['startup_s']:.1f} | "
                f"{_gb(rec['rss_bytes'])} | {_gb(sched)} | {kv.get('max_running_requests')} | "
                f"{r2t_s} | {rec.get('foreign_cores_during_startup', 0):.2f} |"
            )
        else:
            add(
                f"| {ctx} | {rec['mode']} | **no**: exit code {rec['exit_code']} after "
                f"{rec['failed_after_s']:.0f} s | - | - | - | - | see below | - |"
            )
    failures = [r for r in data["startup"] if not r["started"]]
    if failures:
        add("")
        add("Start-ups that failed, with the error line from the server log:")
        add("")
        for rec in failures:
            add(
                f"- {rec['mode']} at {_ctx(rec['context'])} ({rec['context']:,} tokens): exit code "
                f"`{rec['exit_code']}` after {rec['failed_after_s']:.1f} s:"
            )
            add(f"  `{rec['error_line']}`")
    add("")
    seg_ok = [r for r in data["startup"] if r["started"] and r["mode"] == "segmented"]
    if seg_ok:
        seg = (seg_ok[0].get("kv_alloc") or {}).get("segments") or {}
        add(
            f"Segmented KV pool: {seg.get('total_segments')} segments of "
            f"{seg.get('segment_tokens')} tokens; at start-up {seg.get('committed_segments')} "
            f"segment is committed ({(seg.get('committed_bytes') or 0) / 1e6:.1f} MB of "
            f"{(seg.get('reserved_bytes') or 0) / 1e6:.1f} MB reserved)."
        )
        add("")
    add("## 2. Throughput (segmented / static)")
    add("")
    add(
        f"Prefill: {s['prefill_batches']} batches of {s['batch']} concurrent requests, each a "
        f"{s['prefill_len']}-token prompt of random token ids (new ones every round, the same "
        "for both modes within a round, so the radix cache never hits) and `max_new_tokens=1`; "
        "prompt tokens / wall time. Decode: "
        f"{s['batch']} concurrent requests with {s['decode_prompt_len']}-token prompts, "
        f"`max_new_tokens={s['decode_tokens']}`, `ignore_eos`; generated tokens / wall time "
        "(the short prefill is included). Both servers of a context run at once and are "
        f"measured alternately for {s['rounds']} rounds (order swapped every round, after an "
        "untimed warm-up of each); the one not being measured is paused with SIGSTOP, because an "
        "idle SGLang scheduler busy-polls a full core. Values are medians over the rounds; the "
        "client is Python threads with `urllib` on the same 2 cores. Each measurement waits "
        "for a quiet machine first (as for start-ups, up to 60 s), and a measurement during "
        "which processes outside the benchmark used more than "
        f"{s['foreign_limit']} cores on average is redone with fresh prompts (up to "
        f"{s['max_retries']} times; the rejected attempts are kept in the JSON)."
    )
    add("")
    add(
        "The ratio is segmented throughput divided by static throughput: 1.00 means no "
        "difference, below 1 means segmented is slower. The target is >= 0.99. "
        "The per-round ratios show how much the same-round comparison moves with machine noise."
    )
    add("")
    add(
        "| context | phase | static (tok/s) | segmented (tok/s) | segmented/static "
        "| per-round ratios | target >= 0.99 |"
    )
    add("|---:|---|---:|---:|---:|---|---|")
    redone = 0
    for tp in data["throughput"]:
        redone += sum(len(x.get("rejected_attempts", [])) for x in tp.get("rounds", []))
        if "skipped" in tp:
            add(f"| {_ctx(tp['context'])} | skipped: {tp['skipped']} | | | | | |")
            continue
        for phase in ("prefill", "decode"):
            st = tp["median"]["static"][f"{phase}_tokens_per_s"]
            sg = tp["median"]["segmented"][f"{phase}_tokens_per_s"]
            ratio = tp["ratio_segmented_over_static"][phase]
            rounds = ", ".join(f"{x[phase]:.3f}" for x in tp["per_round_ratio"])
            ok = "met" if ratio >= 0.99 else "**not met**"
            add(
                f"| {_ctx(tp['context'])} | {phase} | {st:,.0f} | {sg:,.0f} | **{ratio:.3f}** | "
                f"{rounds} | {ok} |"
            )
    add("")
    noisy = sum(x.get("noisy", False) for tp in data["throughput"] for x in tp.get("rounds", []))
    add(
        f"Measurements redone because of outside load: {redone}; kept although still above the "
        f"limit after the last retry: {noisy}."
    )
    add("")
    for tp in data["throughput"]:
        if "after" not in tp:
            continue
        seg = (tp["after"]["segmented"].get("kv_alloc") or {}).get("segments") or {}
        add(
            f"After the {_ctx(tp['context'])} rounds the segmented server had committed "
            f"{seg.get('commits')} times and released {seg.get('releases')} times "
            f"(peak {seg.get('peak_committed_segments')} of {seg.get('total_segments')} segments, "
            f"{seg.get('committed_segments')} committed at the end; the radix cache keeps "
            "finished requests' KV, so the pool stays filled until evicted). RSS then: static "
            f"{_gb(tp['after']['static']['rss_bytes'])} GB, segmented "
            f"{_gb(tp['after']['segmented']['rss_bytes'])} GB."
        )
        add("")
    add("## 3. Cost of committing one segment (in process, CPU backing)")
    add("")
    add(
        "`SegmentedBuffers.commit_segment` / `release_segment` over `CpuMmapBacking` "
        "(commit = `MADV_POPULATE_WRITE`, release = `MADV_DONTNEED`), timed alone in the "
        "benchmark process with no server running; median and 90th percentile over the "
        "repetitions."
    )
    add("")
    add(
        "| segment | total bytes | reps | commit median | commit p90 | release median "
        "| release p90 | commit rate |"
    )
    add("|---|---:|---:|---:|---:|---:|---:|---:|")
    for c in data["segment_cost"]:
        add(
            f"| {c['name']}, {c['segment_tokens']} tokens "
            f"| {c['segment_bytes_total'] / 2**20:.0f} MB "
            f"| {c['repetitions']} | {c['commit_median_s'] * 1e3:.2f} ms "
            f"| {c['commit_p90_s'] * 1e3:.2f} ms | {c['release_median_s'] * 1e3:.2f} ms "
            f"| {c['release_p90_s'] * 1e3:.2f} ms | {c['commit_gb_per_s']:.1f} GB/s |"
        )
    add("")
    add(
        "The GPU-like row only has a GPU's shape (64 buffers, 2 MB each per segment, 2 MB "
        "granularity); it still commits host memory. On a GPU the cost would be "
        "`cuMemCreate` + `cuMemMap` + `cuMemSetAccess` per buffer, not measured here."
    )
    add("")
    add("## Files")
    add("")
    add(
        "- `docs/runs/benchmark.json`: every raw number (per-round throughput, RSS samples and per-"
        "process RSS, server info, log lines, every commit/release timing)."
    )
    add("- `docs/runs/benchmark.png`: RSS per context and mode, start-up time, throughput ratios.")
    add("- `benchmark/bench_kv_alloc.py`: the benchmark; `--from-json` re-renders these files.")
    add("")
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for benchmark.{json,md,png}")
    p.add_argument("--model", type=Path, default=REPO / "models" / "tiny-llama-f32")
    p.add_argument("--contexts", type=int, nargs="+", default=list(DEFAULT_CONTEXTS))
    p.add_argument(
        "--throughput-contexts",
        type=int,
        nargs="*",
        default=list(DEFAULT_THROUGHPUT_CONTEXTS),
        help="contexts for part 2 (skipped for a context where either mode fails to start)",
    )
    p.add_argument("--max-total-tokens", type=int, default=65536)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prefill-len", type=int, default=1000)
    p.add_argument("--prefill-batches", type=int, default=8)
    p.add_argument("--decode-prompt-len", type=int, default=64)
    p.add_argument("--decode-tokens", type=int, default=256)
    p.add_argument("--segment-reps", type=int, default=50)
    p.add_argument("--settle", type=float, default=3.0, help="seconds after /health before RSS")
    p.add_argument(
        "--foreign-limit",
        type=float,
        default=0.15,
        help="redo a throughput measurement when other processes used more than this many "
        "cores on average during it (the machine may be shared)",
    )
    p.add_argument(
        "--segment-hold-off",
        type=float,
        default=SEGMENT_HOLD_OFF_S,
        help="--kv-segment-hold-off for segmented servers (default: steady state)",
    )
    p.add_argument("--max-retries", type=int, default=3)
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=180.0,
        help="max seconds to wait for a quiet machine before each start-up",
    )
    p.add_argument("--retry-wait", type=float, default=5.0)
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--from-json", type=Path, help="only re-render md/png from this JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    global SEGMENT_HOLD_OFF_S
    cfg = parse_args(argv)
    SEGMENT_HOLD_OFF_S = cfg.segment_hold_off
    cfg.out.mkdir(parents=True, exist_ok=True)
    from plot import render_png

    if cfg.from_json:
        data = json.loads(cfg.from_json.read_text())
    else:
        data = run(cfg, argv)
        (cfg.out / "benchmark.json").write_text(json.dumps(data, indent=1) + "\n")
        (cfg.out / "benchmark.partial.json").unlink(missing_ok=True)
    (cfg.out / "benchmark.md").write_text(render_md(data))
    render_png(data, cfg.out / "benchmark.png")
    log(f"wrote {cfg.out / 'benchmark.json'}, benchmark.md, benchmark.png")
    return 0


def _save_partial(cfg: argparse.Namespace, data: dict[str, Any]) -> None:
    """Keep what is measured so far (benchmark.partial.json) in case the run is interrupted."""
    (cfg.out / "benchmark.partial.json").write_text(json.dumps(data, indent=1) + "\n")


def run(cfg: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    t_start = time.monotonic()
    started_at = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    model = ensure_tiny_model(cfg.model, dtype="float32")
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    given = sys.argv[1:] if argv is None else argv
    command = "python benchmark/bench_kv_alloc.py " + shlex.join(given)
    data: dict[str, Any] = {
        "command": command,
        "started_at": started_at,
        "machine": provenance.machine_info(),
        "model": {"path": str(model), "config": json.loads((model / "config.json").read_text())},
        "settings": {k: v for k, v in vars(cfg).items() if k not in ("out", "model", "from_json")},
        "git": provenance.git_state(),
    }
    # Part 1: one launch per (context, mode); the first mode alternates between contexts so
    # neither mode always gets the colder first launch.
    startup: list[dict[str, Any]] = []
    for i, context in enumerate(cfg.contexts):
        order = MODES if i % 2 == 0 else MODES[::-1]
        for mode in order:
            rec, server = start_and_measure(
                model, mode, context, cfg.max_total_tokens, cfg.settle, cfg.start_timeout, cfg
            )
            if server is not None:
                _stop(server)
            startup.append(rec)
    startup.sort(key=lambda r: (r["context"], MODES.index(r["mode"])))
    data["startup"] = startup
    _save_partial(cfg, data)

    # Part 2: throughput where both modes start.
    throughput = []
    for context in cfg.throughput_contexts:
        ok = {r["mode"]: r["started"] for r in startup if r["context"] == context}
        if ok and not all(ok.get(m, True) for m in MODES):
            throughput.append({"context": context, "skipped": "a mode did not start"})
            continue
        log(f"throughput at context {context}")
        throughput.append(throughput_at(model, context, cfg, vocab))
        data["throughput"] = throughput
        _save_partial(cfg, data)
    data["throughput"] = throughput
    # Part 3 last, with every server stopped, and with the geometry the server really used.
    seg = next(
        (
            (r.get("kv_alloc") or {}).get("segments")
            for r in startup
            if r["started"] and r["mode"] == "segmented"
        ),
        None,
    )
    log("segment commit/release cost (in process)")
    data["segment_cost"] = segment_costs(model, seg, cfg.segment_reps)
    data["duration_s"] = time.monotonic() - t_start
    return data


if __name__ == "__main__":
    raise SystemExit(main())
