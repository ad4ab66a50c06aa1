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
import json
import os
import re
import shlex
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import provenance  # noqa: E402
from bench_kv_alloc_load import measure_decode, measure_prefill  # noqa: E402
from bench_kv_alloc_report import MODES, render_md  # noqa: E402
from bench_kv_alloc_segment_cost import segment_costs  # noqa: E402

from sglang_kvalloc_harness.serving import LocalServer  # noqa: E402
from sglang_kvalloc_harness.tiny_model import ensure as ensure_tiny_model  # noqa: E402

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


# -- part 2: throughput ---------------------------------------------------------------------


@contextmanager
def _awake(server: LocalServer) -> Iterator[LocalServer]:
    """Resume a paused server for the requests inside, then pause it again. Not paused again
    when the requests raise: the caller stops every server then anyway."""
    server.resume()
    time.sleep(0.3)
    yield server
    server.pause()


def _start_paused(
    model: Path, context: int, cfg: argparse.Namespace, servers: dict[str, LocalServer]
) -> tuple[dict[str, Any], str | None]:
    """Start both modes at `context` and pause each; every server that started is put in
    `servers` (for the caller to stop). Returns the start-up summaries and the mode that did
    not start, if one did not (the other is then not tried)."""
    starts: dict[str, Any] = {}
    for mode in MODES:
        rec, server = start_and_measure(
            model, mode, context, cfg.max_total_tokens, 0.0, cfg.start_timeout, cfg
        )
        starts[mode] = {k: rec.get(k) for k in ("started", "startup_s", "error_line")}
        if server is None:
            return starts, mode
        servers[mode] = server
        server.pause()
    return starts, None


def _warm_up(servers: dict[str, LocalServer], cfg: argparse.Namespace, vocab: int) -> None:
    """Two untimed prefill and decode measurements per server: first requests pay lazy
    initialisation."""
    for mode in MODES:
        with _awake(servers[mode]) as server:
            for k in range(2):
                measure_prefill(server, 10_000 + k, cfg, vocab)
                measure_decode(server, 10_000 + k, cfg, vocab)


def _measure_quietly(
    servers: dict[str, LocalServer],
    mode: str,
    context: int,
    r: int,
    cfg: argparse.Namespace,
    vocab: int,
) -> dict[str, Any]:
    """Round `r`'s prefill and decode of one (awake) server, redone with fresh prompts while
    other processes used more than cfg.foreign_limit cores (up to cfg.max_retries times).
    Both modes get the same prompts in a round, new prompts every round (and every retry), so
    the radix cache never hits."""
    server = servers[mode]
    everyone = list(servers.values())
    rejected: list[dict[str, Any]] = []
    for attempt in range(cfg.max_retries + 1):
        seed = (r + 1) * 10 + attempt
        waited = wait_quiet(everyone, cfg.foreign_limit, 60.0)
        with ForeignCpu(everyone) as fpre:
            pre = measure_prefill(server, seed, cfg, vocab)
        with ForeignCpu(everyone) as fdec:
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
    return {
        "round": r,
        "mode": mode,
        "prefill": pre,
        "decode": dec,
        "noisy": noisy,
        "rejected_attempts": rejected,
    }


def _measure_rounds(
    servers: dict[str, LocalServer], context: int, cfg: argparse.Namespace, vocab: int
) -> list[dict[str, Any]]:
    """cfg.rounds rounds, each measuring both modes, the order swapped every round; the server
    not being measured stays paused."""
    rounds: list[dict[str, Any]] = []
    for r in range(cfg.rounds):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            with _awake(servers[mode]):
                rounds.append(_measure_quietly(servers, mode, context, r, cfg, vocab))
    return rounds


def _state_after(servers: dict[str, LocalServer]) -> dict[str, Any]:
    """Each server's RSS and allocator state after the rounds."""
    after: dict[str, Any] = {}
    for mode in MODES:
        with _awake(servers[mode]) as server:
            after[mode] = {"rss_bytes": server.rss_bytes(), **kv_alloc_info(server)}
    return after


def _throughput_record(
    context: int,
    starts: dict[str, Any],
    rounds: list[dict[str, Any]],
    after: dict[str, Any],
    n_rounds: int,
) -> dict[str, Any]:
    """The JSON record of one context: raw rounds, medians per mode, segmented/static ratios of
    the medians and of every round (those show how much of the spread is noise common to both
    modes)."""
    med: dict[str, dict[str, float]] = {}
    for mode in MODES:
        mine = [x for x in rounds if x["mode"] == mode]
        med[mode] = {
            f"{ph}_tokens_per_s": statistics.median(x[ph]["tokens_per_s"] for x in mine)
            for ph in ("prefill", "decode")
        }
    per_round = []
    for r in range(n_rounds):
        s = next(x for x in rounds if x["round"] == r and x["mode"] == "static")
        g = next(x for x in rounds if x["round"] == r and x["mode"] == "segmented")
        per_round.append(
            {"round": r}
            | {ph: g[ph]["tokens_per_s"] / s[ph]["tokens_per_s"] for ph in ("prefill", "decode")}
        )
    ratio = {
        ph: med["segmented"][f"{ph}_tokens_per_s"] / med["static"][f"{ph}_tokens_per_s"]
        for ph in ("prefill", "decode")
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


def throughput_at(model: Path, context: int, cfg: argparse.Namespace, vocab: int) -> dict[str, Any]:
    """Part 2 at one context: both modes' servers run at once, measured alternately over
    cfg.rounds rounds after a warm-up; skipped when either mode does not start."""
    servers: dict[str, LocalServer] = {}
    try:
        starts, failed = _start_paused(model, context, cfg, servers)
        if failed is not None:
            return {"context": context, "skipped": f"{failed} did not start", "starts": starts}
        _warm_up(servers, cfg, vocab)
        rounds = _measure_rounds(servers, context, cfg, vocab)
        after = _state_after(servers)
    finally:
        for server in servers.values():
            _stop(server)
    return _throughput_record(context, starts, rounds, after, cfg.rounds)


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
