"""benchmark.md for bench_kv_alloc.py: the findings and tables rendered from its JSON.

Kept apart from the measuring code so `--from-json` re-renders without touching servers, and so
each section of the page is one short function that returns its lines; `render_md` joins them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# The allocation modes, in the order every table and finding lists them (the benchmark
# measures them in this order too).
MODES = ("static", "segmented")
TARGET_RATIO = 0.99


def _gb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def _ctx(n: int) -> str:
    from plot import context_label  # one label format for the table and the plot

    return context_label(n)


def _scheduler_rss(rec: dict[str, Any]) -> int:
    """Resident bytes of the scheduler process(es) of one start-up record."""
    return sum(v for k, v in rec["rss_by_process"].items() if "scheduler" in k)


# -- findings -------------------------------------------------------------------------------


def _rss_findings(by: dict[tuple[int, str], dict[str, Any]]) -> list[str]:
    """One line per mode: RSS after start-up at every context, or the failure."""
    out: list[str] = []
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
    return out


def _flatness_findings(by: dict[tuple[int, str], dict[str, Any]]) -> list[str]:
    """Whether the segmented scheduler's RSS grows from the smallest to the largest context
    (nothing when fewer than two segmented servers started)."""
    seg = [by[k] for k in sorted(by) if k[1] == "segmented" and by[k]["started"]]
    if len(seg) < 2:
        return []
    lo, hi = seg[0], seg[-1]
    extra = _scheduler_rss(hi) - _scheduler_rss(lo)
    per_pos = extra / (hi["context"] - lo["context"])
    if abs(extra) > 50e6:
        return [
            f"Segmented RSS is not flat in the context: the scheduler holds "
            f"{extra / 1e6:.0f} MB more at {_ctx(hi['context'])} than at "
            f"{_ctx(lo['context'])} (about {per_pos:.0f} bytes per context position)."
        ]
    return [
        f"Segmented RSS is flat in the context: the scheduler holds {extra / 1e6:+.0f} MB "
        f"at {_ctx(hi['context'])} against {_ctx(lo['context'])}."
    ]


def _throughput_finding(tp: dict[str, Any]) -> str:
    """The median ratios of one context against the target, and the per-round spread."""
    r = tp["ratio_segmented_over_static"]
    verdict = ", ".join(
        f"{ph} {r[ph]:.3f} ({'meets' if r[ph] >= TARGET_RATIO else 'below'} the 0.99 target)"
        for ph in ("prefill", "decode")
    )
    spread = {
        ph: (
            min(x[ph] for x in tp["per_round_ratio"]),
            max(x[ph] for x in tp["per_round_ratio"]),
        )
        for ph in ("prefill", "decode")
    }
    return (
        f"Throughput at {_ctx(tp['context'])}, segmented/static medians: {verdict}; "
        f"per-round ratios span {spread['prefill'][0]:.2f}-{spread['prefill'][1]:.2f} "
        f"(prefill) and {spread['decode'][0]:.2f}-{spread['decode'][1]:.2f} (decode)."
    )


def findings(data: dict[str, Any]) -> list[str]:
    """Plain statements computed from the numbers (no judgement beyond the 0.99 target)."""
    by = {(r["context"], r["mode"]): r for r in data["startup"]}
    out = _rss_findings(by) + _flatness_findings(by)
    out += [
        _throughput_finding(tp) for tp in data["throughput"] if "ratio_segmented_over_static" in tp
    ]
    return out


# -- sections -------------------------------------------------------------------------------


def _intro_lines(data: dict[str, Any]) -> list[str]:
    """Title and what the numbers can and cannot show (CPU engine, no GPU)."""
    return [
        "# Benchmark: `--kv-alloc-mode static` vs `segmented`",
        "",
        "**No GPU was used.** Every number below comes from SGLang's CPU engine "
        "(`SGLANG_USE_CPU_ENGINE=1`, `--device cpu`) serving the built-in tiny Llama "
        "(2 layers, hidden 64, 2 KV heads of dim 16, float32, random weights). They show what "
        "the allocation mode changes in memory and start-up, and whether segmented mode costs "
        "serving speed on this engine; they say nothing about GPU speed, where segments are "
        "committed with the CUDA VMM driver calls instead of `madvise` (that backing's own "
        "suite ran on lent H100s, each run listed in gpu.md with what it covered).",
        "",
    ]


def _findings_lines(data: dict[str, Any]) -> list[str]:
    return ["## Findings in this run", "", *(f"- {line}" for line in findings(data)), ""]


def _machine_lines(data: dict[str, Any]) -> list[str]:
    m = data["machine"]
    return [
        "## Machine",
        "",
        f"- {m['logical_cpus']} cores ({m['cpu_model']}), "
        f"{m['memory_total_bytes'] / 2**30:.0f} GB RAM ({m['memory_total_bytes'] / 1e9:.1f} GB), "
        f"swap {m['swap_total_bytes'] / 1e9:.0f} GB, no GPU",
        f"- Linux {m['kernel']}, `vm.overcommit_memory={m['vm_overcommit_memory']}`, "
        f"Python {m['python']}, torch {m['torch']}, SGLang {m['sglang']}",
        f"- run on {data['started_at']}, took {data['duration_s'] / 60:.1f} minutes",
        "",
    ]


def _command_lines(data: dict[str, Any]) -> list[str]:
    """The benchmark's command line and how each server was launched."""
    s = data["settings"]
    return [
        "## Command",
        "",
        "```sh",
        data["command"],
        "```",
        "",
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
        "a reservation committed only where requests write in segmented mode.",
        "",
    ]


# -- section 1: start-up --------------------------------------------------------------------


def _startup_row(rec: dict[str, Any]) -> str:
    """One table row: the start-up's time and memory, or how it failed."""
    ctx = _ctx(rec["context"])
    if not rec["started"]:
        return (
            f"| {ctx} | {rec['mode']} | **no**: exit code {rec['exit_code']} after "
            f"{rec['failed_after_s']:.0f} s | - | - | - | - | see below | - |"
        )
    kv = rec.get("kv_alloc") or {}
    r2t = kv.get("req_to_token_bytes")
    if rec["mode"] == "segmented":
        seg = kv.get("segments") or {}
        r2t_s = (
            f"{_gb(r2t)} GB reserved, "
            f"{(seg.get('req_to_token_resident_bytes') or 0) / 1e6:.1f} MB resident"
        )
    else:
        r2t_s = f"{_gb(r2t)} GB allocated"
    return (
        f"| {ctx} | {rec['mode']} | yes | {rec['startup_s']:.1f} | "
        f"{_gb(rec['rss_bytes'])} | {_gb(_scheduler_rss(rec))} | "
        f"{kv.get('max_running_requests')} | "
        f"{r2t_s} | {rec.get('foreign_cores_during_startup', 0):.2f} |"
    )


def _startup_failure_lines(startup: list[dict[str, Any]]) -> list[str]:
    """The error line of every start-up that failed (nothing when all started)."""
    failures = [r for r in startup if not r["started"]]
    if not failures:
        return []
    lines = ["", "Start-ups that failed, with the error line from the server log:", ""]
    for rec in failures:
        lines.append(
            f"- {rec['mode']} at {_ctx(rec['context'])} ({rec['context']:,} tokens): exit code "
            f"`{rec['exit_code']}` after {rec['failed_after_s']:.1f} s:"
        )
        lines.append(f"  `{rec['error_line']}`")
    return lines


def _segment_pool_lines(startup: list[dict[str, Any]]) -> list[str]:
    """The segmented pool's geometry at start-up, from the first segmented server that started."""
    seg_ok = [r for r in startup if r["started"] and r["mode"] == "segmented"]
    if not seg_ok:
        return []
    seg = (seg_ok[0].get("kv_alloc") or {}).get("segments") or {}
    return [
        f"Segmented KV pool: {seg.get('total_segments')} segments of "
        f"{seg.get('segment_tokens')} tokens; at start-up {seg.get('committed_segments')} "
        f"segment is committed ({(seg.get('committed_bytes') or 0) / 1e6:.1f} MB of "
        f"{(seg.get('reserved_bytes') or 0) / 1e6:.1f} MB reserved).",
        "",
    ]


def _startup_lines(data: dict[str, Any]) -> list[str]:
    """Section 1: how start-up is measured, the table, the failures, the segment pool."""
    s = data["settings"]
    return [
        "## 1. Start-up and resident memory",
        "",
        "Start-up is launch to the first `/health` 200 (one launch per cell, so a second or two "
        "of noise). RSS is summed over the server's processes (launcher with the tokenizer "
        "manager, scheduler, detokenizer, helper) after start-up; the scheduler alone is in "
        "its own column. The machine may be shared: before each launch the benchmark waits "
        f"(up to {s.get('quiet_wait', 0):.0f} s) until processes outside it use less than "
        f'{s["foreign_limit"]} cores, and "other load" is the average number of cores such '
        "processes still kept busy during the start-up; start-up times with a high value there "
        "are inflated.",
        "",
        "| context | mode | started | start-up (s) | RSS all processes (GB) | scheduler RSS (GB) "
        "| max running req. | req_to_token at start | other load (cores) |",
        "|---:|---|---|---:|---:|---:|---:|---|---:|",
        *(_startup_row(rec) for rec in data["startup"]),
        *_startup_failure_lines(data["startup"]),
        "",
        *_segment_pool_lines(data["startup"]),
    ]


# -- section 2: throughput ------------------------------------------------------------------


def _throughput_method_lines(s: dict[str, Any]) -> list[str]:
    """How prefill and decode throughput are measured and what the ratio means."""
    return [
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
        f"{s['max_retries']} times; the rejected attempts are kept in the JSON).",
        "",
        "The ratio is segmented throughput divided by static throughput: 1.00 means no "
        "difference, below 1 means segmented is slower. The target is >= 0.99. "
        "The per-round ratios show how much the same-round comparison moves with machine noise.",
        "",
    ]


def _throughput_rows(tp: dict[str, Any]) -> list[str]:
    """The prefill and decode rows of one context (one row when it was skipped)."""
    if "skipped" in tp:
        return [f"| {_ctx(tp['context'])} | skipped: {tp['skipped']} | | | | | |"]
    rows = []
    for phase in ("prefill", "decode"):
        st = tp["median"]["static"][f"{phase}_tokens_per_s"]
        sg = tp["median"]["segmented"][f"{phase}_tokens_per_s"]
        ratio = tp["ratio_segmented_over_static"][phase]
        rounds = ", ".join(f"{x[phase]:.3f}" for x in tp["per_round_ratio"])
        ok = "met" if ratio >= TARGET_RATIO else "**not met**"
        rows.append(
            f"| {_ctx(tp['context'])} | {phase} | {st:,.0f} | {sg:,.0f} | **{ratio:.3f}** | "
            f"{rounds} | {ok} |"
        )
    return rows


def _redone_line(throughput: list[dict[str, Any]]) -> str:
    """How many measurements outside load made the benchmark redo, or keep although noisy."""
    rounds = [x for tp in throughput for x in tp.get("rounds", [])]
    redone = sum(len(x.get("rejected_attempts", [])) for x in rounds)
    noisy = sum(x.get("noisy", False) for x in rounds)
    return (
        f"Measurements redone because of outside load: {redone}; kept although still above the "
        f"limit after the last retry: {noisy}."
    )


def _after_rounds_lines(tp: dict[str, Any]) -> list[str]:
    """The segmented pool's commits and both servers' RSS after one context's rounds."""
    if "after" not in tp:
        return []
    seg = (tp["after"]["segmented"].get("kv_alloc") or {}).get("segments") or {}
    return [
        f"After the {_ctx(tp['context'])} rounds the segmented server had committed "
        f"{seg.get('commits')} times and released {seg.get('releases')} times "
        f"(peak {seg.get('peak_committed_segments')} of {seg.get('total_segments')} segments, "
        f"{seg.get('committed_segments')} committed at the end; the radix cache keeps "
        "finished requests' KV, so the pool stays filled until evicted). RSS then: static "
        f"{_gb(tp['after']['static']['rss_bytes'])} GB, segmented "
        f"{_gb(tp['after']['segmented']['rss_bytes'])} GB.",
        "",
    ]


def _throughput_lines(data: dict[str, Any]) -> list[str]:
    """Section 2: method, the ratio table, retries, and the state after the rounds."""
    throughput = data["throughput"]
    return [
        "## 2. Throughput (segmented / static)",
        "",
        *_throughput_method_lines(data["settings"]),
        "| context | phase | static (tok/s) | segmented (tok/s) | segmented/static "
        "| per-round ratios | target >= 0.99 |",
        "|---:|---|---:|---:|---:|---|---|",
        *(row for tp in throughput for row in _throughput_rows(tp)),
        "",
        _redone_line(throughput),
        "",
        *(line for tp in throughput for line in _after_rounds_lines(tp)),
    ]


# -- section 3 and files --------------------------------------------------------------------


def _segment_cost_row(c: dict[str, Any]) -> str:
    return (
        f"| {c['name']}, {c['segment_tokens']} tokens "
        f"| {c['segment_bytes_total'] / 2**20:.0f} MB "
        f"| {c['repetitions']} | {c['commit_median_s'] * 1e3:.2f} ms "
        f"| {c['commit_p90_s'] * 1e3:.2f} ms | {c['release_median_s'] * 1e3:.2f} ms "
        f"| {c['release_p90_s'] * 1e3:.2f} ms | {c['commit_gb_per_s']:.1f} GB/s |"
    )


def _segment_cost_lines(data: dict[str, Any]) -> list[str]:
    """Section 3: commit/release timings of one segment, in process."""
    return [
        "## 3. Cost of committing one segment (in process, CPU backing)",
        "",
        "`SegmentedBuffers.commit_segment` / `release_segment` over `CpuMmapBacking` "
        "(commit = `MADV_POPULATE_WRITE`, release = `MADV_DONTNEED`), timed alone in the "
        "benchmark process with no server running; median and 90th percentile over the "
        "repetitions.",
        "",
        "| segment | total bytes | reps | commit median | commit p90 | release median "
        "| release p90 | commit rate |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *(_segment_cost_row(c) for c in data["segment_cost"]),
        "",
        "The GPU-like row only has a GPU's shape (64 buffers, 2 MB each per segment, 2 MB "
        "granularity); it still commits host memory. On a GPU the cost would be "
        "`cuMemCreate` + `cuMemMap` + `cuMemSetAccess` per buffer, not measured here.",
        "",
    ]


def _files_lines(data: dict[str, Any]) -> list[str]:
    return [
        "## Files",
        "",
        "- `docs/runs/benchmark.json`: every raw number (per-round throughput, RSS samples and "
        "per-process RSS, server info, log lines, every commit/release timing).",
        "- `docs/runs/benchmark.png`: RSS per context and mode, start-up time, throughput ratios.",
        "- `benchmark/bench_kv_alloc.py`: the benchmark; `--from-json` re-renders these files.",
        "",
    ]


SECTIONS: tuple[Callable[[dict[str, Any]], list[str]], ...] = (
    _intro_lines,
    _findings_lines,
    _machine_lines,
    _command_lines,
    _startup_lines,
    _throughput_lines,
    _segment_cost_lines,
    _files_lines,
)


def render_md(data: dict[str, Any]) -> str:
    """benchmark.md from bench_kv_alloc.py's JSON: every section's lines, in page order."""
    return "\n".join(line for section in SECTIONS for line in section(data))
