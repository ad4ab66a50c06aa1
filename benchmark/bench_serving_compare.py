"""static against segmented with upstream's own serving benchmark (not a CI test).

For each context length, a static and a segmented server (SGLang's CPU engine, the tiny
Llama) run side by side; `sglang.bench_serving` (upstream's `sglang.benchmark.serving`, called
in-process through its own command line) sends each the same random-ids workload, round after
round, alternating which server goes first, at every request rate; the server not being
measured is paused (SIGSTOP), as bench_kv_alloc.py does, since an idle CPU-engine scheduler
busy-polls. Per round and rate the
segmented/static ratio of each metric is taken; the report gives the median ratio and a 95%
confidence interval of the mean ratio (t-interval on log ratios over the rounds).

    python benchmark/bench_serving_compare.py --out docs/runs/ [--rounds 8]

One row uses the default pool (no --max-total-tokens; upstream sizes the pool from memory,
with --mem-fraction-static lowered so both servers fit on this machine): there the KV pool
itself is reserved and committed by segment, not only req_to_token.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import provenance  # noqa: E402

from sglang_kvalloc_harness.serving import LocalServer  # noqa: E402
from sglang_kvalloc_harness.tiny_model import ensure as ensure_tiny_model  # noqa: E402

ROLES = ("baseline", "candidate")
# What each role's server runs, per comparison. "modes": the allocation modes (segmented
# commits once and keeps its memory for the run). "growth": segmented that gives segments
# back as soon as they are empty (hold-off 0: commits and releases all through the run)
# against one that never does, for the cost of growth on step time.
PAIRS = {
    "modes": {
        "baseline": ["--kv-alloc-mode", "static"],
        "candidate": ["--kv-alloc-mode", "segmented", "--kv-segment-hold-off", "600"],
    },
    "growth": {
        "baseline": ["--kv-alloc-mode", "segmented", "--kv-segment-hold-off", "600"],
        "candidate": ["--kv-alloc-mode", "segmented", "--kv-segment-hold-off", "0"],
    },
}
# Higher is better for these; lower for the latencies. The ratio is always candidate/baseline.
THROUGHPUT = ("request_throughput", "input_throughput", "output_throughput")
LATENCY = ("median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms", "median_e2e_latency_ms")


def log(msg: str) -> None:
    print(f"[serving {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def bench_once(
    url: str, tokenizer: str, rate: float, cfg: argparse.Namespace, seed: int
) -> dict[str, Any]:
    """One `sglang.bench_serving` run through its own command line; returns its figures."""
    from sglang.benchmark import serving

    with tempfile.NamedTemporaryFile("r", suffix=".jsonl", delete=False) as f:
        out = Path(f.name)
    argv = [
        "bench_serving", "--backend", "sglang", "--base-url", url, "--tokenizer", tokenizer,
        "--model", tokenizer, "--dataset-name", "random-ids",
        "--random-input-len", str(cfg.input_len), "--random-output-len", str(cfg.output_len),
        "--random-range-ratio", "0.5", "--num-prompts", str(cfg.num_prompts),
        "--request-rate", str(rate), "--seed", str(seed), "--output-file", str(out),
        "--disable-tqdm",
    ] + (["--flush-cache"] if cfg.flush_cache else [])  # fmt: skip
    saved = sys.argv
    sys.argv = argv
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            serving.cli_main()
    finally:
        sys.argv = saved
    line = out.read_text().strip().splitlines()[-1]
    out.unlink()
    # The figures only: the per-request lists (texts, latencies) would be MBs per run.
    return {k: v for k, v in json.loads(line).items() if not isinstance(v, (list, dict))}


@contextlib.contextmanager
def running(server: LocalServer) -> Any:
    """Resume ``server`` for the block, then pause it again (SIGSTOP on its process group): an
    idle CPU-engine scheduler busy-polls, and on two cores the paused one must not steal a
    core from the one being measured."""
    server.resume()
    try:
        yield server
    finally:
        server.pause()


def t_interval(ratios: list[float]) -> tuple[float, float]:
    """95% confidence interval of the mean ratio (t on log ratios)."""
    if len(ratios) < 2:
        return (math.nan, math.nan)
    from scipy import stats

    logs = [math.log(r) for r in ratios]
    mean, sd = statistics.fmean(logs), statistics.stdev(logs)
    half = stats.t.ppf(0.975, len(logs) - 1) * sd / math.sqrt(len(logs))
    return (math.exp(mean - half), math.exp(mean + half))


def run_context(
    context: int, pool_args: list[str], model: Path, cfg: argparse.Namespace, label: str
) -> dict[str, Any]:
    env = {"SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN": "1"} if context > 65536 else {}
    common = ["--dtype", "float32", "--context-length", str(context), *pool_args]
    servers = {
        role: LocalServer(model, args=[*common, *PAIRS[cfg.pair][role]], env=env) for role in ROLES
    }
    record: dict[str, Any] = {"label": label, "context": context, "pool_args": pool_args}
    try:
        for mode, server in servers.items():
            started = time.monotonic()
            server.start(timeout=cfg.start_timeout)
            log(f"{label}: {mode} up in {time.monotonic() - started:.0f} s on {server.url}")
            server.pause()
        for server in servers.values():  # warm-up: first requests compile and fault in
            with running(server):
                bench_once(server.url, str(model), math.inf, cfg, seed=1)
        rounds = []
        for r in range(cfg.rounds):
            order = ROLES if r % 2 == 0 else ROLES[::-1]
            for rate in cfg.rates:
                results = {}
                for mode in order:
                    with running(servers[mode]) as server:
                        results[mode] = bench_once(server.url, str(model), rate, cfg, 100 + r)
                rounds.append({"round": r, "rate": rate, "first": order[0], **results})
                s, g = results["baseline"], results["candidate"]
                log(
                    f"{label} round {r} rate {rate}: output tok/s baseline "
                    f"{s['output_throughput']:.0f} candidate {g['output_throughput']:.0f} "
                    f"({g['output_throughput'] / s['output_throughput']:.3f})"
                )
        record["rounds"] = rounds
        record["server_info"] = {}
        for mode, server in servers.items():
            with running(server):
                record["server_info"][mode] = _kv_alloc_info(server.url)
    finally:
        for server in servers.values():
            server.stop()
    record["summary"] = summarize(record["rounds"], cfg.rates)
    return record


def _kv_alloc_info(url: str) -> dict[str, Any]:
    from sglang_kvalloc_harness.serving import http_json

    try:
        info = http_json(f"{url}/server_info")
    except Exception as exc:  # noqa: BLE001 - a report detail, not the measurement
        return {"error": str(exc)}
    internal = (info.get("internal_states") or [{}])[0]
    return internal.get("kv_alloc", {})


def summarize(rounds: list[dict[str, Any]], rates: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for rate in rates:
        these = [r for r in rounds if r["rate"] == rate]
        per_metric = {}
        for metric in THROUGHPUT + LATENCY:
            ratios = [
                r["candidate"][metric] / r["baseline"][metric]
                for r in these
                if r["baseline"].get(metric) and r["candidate"].get(metric) is not None
            ]
            if not ratios:
                continue
            lo, hi = t_interval(ratios)
            per_metric[metric] = {
                "baseline_median": statistics.median(r["baseline"][metric] for r in these),
                "candidate_median": statistics.median(r["candidate"][metric] for r in these),
                "ratio_median": statistics.median(ratios),
                "ratio_ci95": [lo, hi],
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "rounds": len(ratios),
            }
        out[str(rate)] = per_metric
    return out


NAMES = {
    "modes": ("static", "segmented", "static vs segmented"),
    "growth": (
        "segmented, hold-off 600 s",
        "segmented, hold-off 0",
        "the cost of growth: segmented giving segments back at once vs never",
    ),
}


def render(data: dict[str, Any]) -> str:
    base, cand, title = NAMES[data["settings"].get("pair", "modes")]
    lines = [
        f"# {title}, with `sglang.bench_serving`",
        "",
        f"Generated by `{data['command']}` on {data['started_at']} ({data['duration_min']:.0f} "
        "min). **No GPU**: SGLang's CPU engine serving the tiny Llama (2 layers, random "
        "weights, float32) on a 2-core machine; these ratios say whether segmented mode costs "
        "serving speed on this engine, nothing about GPU speed.",
        "",
        f"Workload: upstream's `sglang.bench_serving --dataset-name random-ids`, "
        f"{data['settings']['num_prompts']} prompts, input {data['settings']['input_len']} and "
        f"output {data['settings']['output_len']} tokens (range ratio 0.5), request rates "
        f"{', '.join(str(r) for r in data['settings']['rates'])} per second (inf: all at "
        f"once, saturation)"
        + (
            "; the prefix cache is flushed before every run (upstream's --flush-cache)"
            if data["settings"].get("flush_cache")
            else "; the prefix cache is kept between runs"
        )
        + f". Both servers run side by side; each of "
        f"{data['settings']['rounds']} rounds runs every rate on both, alternating which goes "
        f"first. Ratio = {cand} / {base} per round; the table gives its median, the 95% "
        "confidence interval of the mean (t on log ratios), and the rounds' min-max. "
        "Throughput goal: >= 0.99 with the interval above 0.99; latency ratios: lower is "
        "better.",
        "",
        f"| context (pool) | rate | metric | {base} | {cand} | ratio median | 95% CI | min-max |",
        "|---|---:|---|---:|---:|---:|---|---|",
    ]
    for rec in data["contexts"]:
        for rate, metrics in rec["summary"].items():
            for metric, m in metrics.items():
                lo, hi = m["ratio_ci95"]
                lines.append(
                    f"| {rec['label']} | {rate} | {metric} | {m['baseline_median']:,.1f} | "
                    f"{m['candidate_median']:,.1f} | **{m['ratio_median']:.3f}** | "
                    f"[{lo:.3f}, {hi:.3f}] | {m['ratio_min']:.3f}-{m['ratio_max']:.3f} |"
                )
    throughput = [
        m
        for rec in data["contexts"]
        for metrics in rec["summary"].values()
        for name, m in metrics.items()
        if name in THROUGHPUT
    ]
    if throughput:
        meets = sum(
            1 for m in throughput if m["ratio_median"] >= 0.99 and m["ratio_ci95"][0] >= 0.99
        )
        widths = [(m["ratio_ci95"][1] - m["ratio_ci95"][0]) / 2 for m in throughput]
        lines += [
            "",
            f"Throughput rows (request, input and output tokens/s) meeting the goal, median >= "
            f"0.99 and the interval's lower end >= 0.99: {meets} of {len(throughput)}. Lowest "
            f"median ratio: {min(m['ratio_median'] for m in throughput):.3f}. The 95% intervals "
            f"are +-{statistics.median(widths) * 100:.1f}% wide (median half-width): "
            f"{data['settings']['rounds']} rounds on this shared 2-core machine cannot resolve "
            "a 1% difference; the goal's 'interval narrower than 1%' is not met.",
        ]
    lines += ["", f"What the {cand} servers held after the rounds (`/server_info`):", ""]
    for rec in data["contexts"]:
        seg = rec.get("server_info", {}).get("candidate", {})
        segments = seg.get("segments", {})
        lines.append(
            f"- {rec['label']}: token capacity {seg.get('token_capacity', '?'):,}, committed "
            f"{segments.get('committed_bytes', 0) / 1e6:.1f} MB of "
            f"{segments.get('reserved_bytes', 0) / 1e6:.1f} MB reserved"
            if isinstance(seg.get("token_capacity"), int)
            else f"- {rec['label']}: {seg}"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("docs/runs"))
    p.add_argument(
        "--model", type=Path, default=Path(__file__).resolve().parents[1] / "models" / "tiny-llama"
    )
    p.add_argument("--pair", choices=sorted(PAIRS), default="modes")
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 131072, 1048576])
    p.add_argument("--default-pool-context", type=int, default=2048)
    p.add_argument("--default-pool-mem-fraction", type=float, default=0.25)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--rates", type=float, nargs="+", default=[8.0, math.inf])
    p.add_argument("--num-prompts", type=int, default=48)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument(
        "--flush-cache",
        action="store_true",
        help="empty the prefix cache before every run (upstream's --flush-cache): no run "
        "reuses the previous one's KV, so a server that evicts at idle is not penalized for "
        "cache misses; what remains is the cost of committing",
    )
    p.add_argument("--from-json", type=Path)
    cfg = p.parse_args(argv)
    # A TERM must still run the finally blocks: a paused server left behind keeps its memory.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cfg.out.mkdir(parents=True, exist_ok=True)
    stem = "bench_serving" if cfg.pair == "modes" else f"bench_serving_{cfg.pair}"
    if cfg.from_json:
        data = json.loads(cfg.from_json.read_text())
    else:
        os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
        model = ensure_tiny_model(cfg.model, dtype="float32")
        began = time.time()
        data = {
            "provenance": provenance.record("benchmark/bench_serving_compare.py", argv),
            "command": "python benchmark/bench_serving_compare.py "
            + " ".join(argv or sys.argv[1:]),
            "started_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(began)),
            "settings": {
                k: v for k, v in vars(cfg).items() if k not in ("out", "from_json", "model")
            },
            "contexts": [],
        }
        runs = [
            (c, ["--max-total-tokens", "65536"], f"{c:,} (65,536-token pool)") for c in cfg.contexts
        ]
        if cfg.default_pool_context:
            c = cfg.default_pool_context
            runs.append(
                (c, ["--mem-fraction-static", str(cfg.default_pool_mem_fraction)],
                 f"{c:,} (default pool, mem fraction {cfg.default_pool_mem_fraction})")
            )  # fmt: skip
        for context, pool_args, label in runs:
            data["contexts"].append(run_context(context, pool_args, model, cfg, label))
            data["duration_min"] = (time.time() - began) / 60
            (cfg.out / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
    (cfg.out / f"{stem}.md").write_text(render(data))
    log(f"wrote {cfg.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
