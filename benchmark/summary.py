"""The performance goals (issue 11) against what the benchmarks measured: regenerates the
section between the markers in docs/runs/benchmark.md from the benchmarks' JSON files (not a CI
test; nothing is measured here).

    python benchmark/summary.py [--docs docs]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import provenance  # noqa: E402
from one_batch_compare import cell_summary  # noqa: E402

BEGIN = "<!-- goals:begin (benchmark/summary.py writes this section) -->"
END = "<!-- goals:end -->"
THROUGHPUT = ("request_throughput", "input_throughput", "output_throughput")


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def serving_rows(data: dict[str, Any]) -> list[tuple[str, str, str, dict[str, Any]]]:
    return [
        (ctx["label"], rate, metric, figures)
        for ctx in data["contexts"]
        for rate, metrics in ctx["summary"].items()
        for metric, figures in metrics.items()
    ]


def serving_goal(data: dict[str, Any]) -> list[str]:
    rows = [r for r in serving_rows(data) if r[2] == "output_throughput"]
    met = [r for r in rows if r[3]["ratio_median"] >= 0.99 and r[3]["ratio_ci95"][0] >= 0.99]
    halves = [(f["ratio_ci95"][1] - f["ratio_ci95"][0]) / 2 for *_, f in rows]
    worst = min(rows, key=lambda r: r[3]["ratio_ci95"][0])
    below = sum(f["ratio_median"] < 0.99 for *_, f in rows)
    status = "met" if len(met) == len(rows) and max(halves) <= 0.01 else "**not met**"
    return [
        f"| `bench_serving` output throughput, segmented / static, every context and rate "
        f"(>= 0.99, interval above 0.99, interval narrower than 1%) | medians "
        f"{min(f['ratio_median'] for *_, f in rows):.3f} to "
        f"{max(f['ratio_median'] for *_, f in rows):.3f}; {len(met)} of {len(rows)} rows have "
        f"the whole interval above 0.99; intervals +-{statistics.median(halves) * 100:.1f}% "
        f"(median half-width); lowest interval end {worst[3]['ratio_ci95'][0]:.3f} "
        f"({worst[0]}, rate {worst[1]}) | {status}: {below} row(s) below 0.99 at the median; "
        f"{data['settings']['rounds']} rounds of HTTP serving on a shared 2-core machine "
        f"leave intervals this wide ([bench_serving.md](bench_serving.md)) |"
    ]


def one_batch_goal(data: dict[str, Any]) -> list[str]:
    out = []
    for entry in data["cells"]:
        for key, name in (("median_decode_latency", "decode step"),
                          ("prefill_latency", "prefill")):  # fmt: skip
            row = cell_summary(entry, key)
            lo, hi = row["ratio_ci95"]
            out.append(
                f"| in-process {name} latency, {entry['cell']['label']} (<= 1.01 with the "
                f"interval narrower than 1%) | {row['ratio_median']:.3f} "
                f"[{lo:.3f}, {hi:.3f}] | {_latency_status(lo, hi)} |"
            )
    return out


def _latency_status(lo: float, hi: float) -> str:
    """A latency ratio (segmented / static) against the goal of at most 1% slower."""
    width = f"+-{(hi - lo) / 2 * 100:.0f}%"
    if hi <= 1.01 and hi - lo <= 0.02:
        return "met"
    if hi < 1.0:
        return (
            f"**not resolved** by the goal's own test: segmented faster (the whole interval "
            f"below 1), but the interval ({width}) is wider than 1%"
        )
    if lo > 1.01:
        return "**not met**: segmented slower"
    return (
        f"**not resolved**: interval {width}, process-to-process spread "
        "([one_batch.md](one_batch.md))"
    )


def allocator_goal(data: dict[str, Any], step_ms: float | None = None) -> list[str]:
    out = []
    rows = data["rows"]
    met = 0
    worst = None
    for row in rows:
        ratio = row["ratio_segmented_over_upstream"]["median"]  # the steady pass
        met += ratio <= 1.1
        if worst is None or ratio > worst[0]:
            worst = (ratio, row)
    ratio, row = worst
    faster = (
        ", ".join(
            f"{r['pool_tokens']:,}/page {r['page_size']}/{r['trace']}"
            for r in rows
            if r["ratio_segmented_over_upstream"]["median"] < 1.0
        )
        or "no row"
    )
    step_note = f" (a decode step of this engine takes about {step_ms:.0f} ms)" if step_ms else ""
    if met == len(rows):
        status = "met"
    else:
        status = (
            f"**not met** on {len(rows) - met} rows: up to {_gap_us(rows):.0f} us more per "
            f"scheduler step on them{step_note}; where the time goes: the profile in"
        )
    out.append(
        f"| allocator per scheduler step, segmented / upstream, steady state (<= 1.1 on every "
        f"row) | "
        f"{met} of {len(rows)} rows; worst {ratio:.2f}x ({row['pool_tokens']:,}-token pool, "
        f"page {row['page_size']}, {row['trace']} trace); segmented is faster on {faster} | "
        f"{status} ([allocator_micro.md](allocator_micro.md)) |"
    )
    return out


def _gap_us(rows: list[dict[str, Any]]) -> float:
    return max(
        (r["segmented"]["ns_per_step"]["median"] - r["upstream"]["ns_per_step"]["median"]) / 1e3
        for r in rows
        if r["ratio_segmented_over_upstream"]["median"] > 1.1
    )


def growth_goal(data: dict[str, Any]) -> list[str]:
    out = []
    for ctx in data["contexts"]:
        for rate, metrics in ctx["summary"].items():
            f = metrics.get("p99_itl_ms")
            if not f:
                continue
            lo, hi = f["ratio_ci95"]
            met = hi <= 1.05
            out.append(
                f"| growth: p99 inter-token latency, releasing at once / never, "
                f"{ctx['label']}, rate {rate} (within 5%) | {f['ratio_median']:.3f} "
                f"[{lo:.3f}, {hi:.3f}] | "
                + (
                    "met: the interval's upper end is within 5%"
                    if met
                    else "**not resolved**: the interval reaches past 5%"
                )
                + " ([bench_serving_growth.md](bench_serving_growth.md)) |"
            )
    return out


def gpu_goal(docs: Path) -> list[str]:
    figures = []
    paths = (docs.parent / "gpu-runs").glob("*-h100-suite-*.json")
    for path in sorted(paths, key=lambda p: (len(p.stem), p.stem)):
        data = json.loads(path.read_text())
        d = data.get("decode_time_vmm_vs_ordinary")
        if d:
            run = path.stem.split("-suite-")[1]
            figures.append((run, d, provenance.staleness(data, path)))
    if not figures:
        return []
    text = "; ".join(
        f"run {run}: {d['ratio_mean']:.4f} [{d['ratio_ci95'][0]:.4f}, {d['ratio_ci95'][1]:.4f}]"
        for run, d, _ in figures
    )
    inside = [
        run for run, d, _ in figures if 0.99 <= d["ratio_ci95"][0] <= d["ratio_ci95"][1] <= 1.01
    ]
    status = (
        "met: every interval within 1% of parity"
        if len(inside) == len(figures)
        else f"{len(inside)} of {len(figures)} intervals within 1% of parity"
    )
    return [
        f"| on a GPU (H100): upstream's triton decode kernel over VMM-mapped K/V / over "
        f"ordinary memory, 1M cached tokens | {text} | {status} "
        "([gpu-runs/runs.md](../gpu-runs/runs.md)) | "
        f"{figures[-1][2]} |"
    ]


def render(docs: Path) -> str:
    lines = [
        BEGIN,
        "## Performance goals (issue 11) and where they stand",
        "",
        "Regenerated from the JSON files by `python benchmark/summary.py`. CPU engine figures"
        " unless the row says GPU. Ratios: median [95% interval].",
        "",
        "| goal | measured | status | measured on |",
        "|---|---|---|---|",
    ]
    sources = {
        "one_batch.json": one_batch_goal,
        "bench_serving.json": serving_goal,
        "allocator_micro.json": allocator_goal,
        "bench_serving_growth.json": growth_goal,
    }
    one_batch = _load(docs / "one_batch.json")
    step_ms = None
    if one_batch is not None:  # the static decode step, for scale
        step_ms = 1e3 * statistics.median(
            cell_summary(entry, "median_decode_latency")["static_median"]
            for entry in one_batch["cells"]
        )
    for name, goal in sources.items():
        data = _load(docs / name)
        if data is not None:
            rows = goal(data, step_ms) if goal is allocator_goal else goal(data)
            source = provenance.staleness(data, docs / name)
            lines += [f"{row} {source} |" for row in rows]
    lines += gpu_goal(docs)
    plots = [name for name in ("benchmark.png", "allocator_micro.png") if (docs / name).exists()]
    lines += [
        "| plots with matplotlib | `benchmark/plot.py` (extra `benchmark`), "
        + ", ".join(f"[{name}]({name})" for name in plots)
        + f" | {'met' if len(plots) == 2 else '**not met**: a plot is missing'} | - |",
        "",
        END,
    ]
    return "\n".join(lines)


EVIDENCE_BEGIN = "<!-- measured:begin (benchmark/summary.py writes this section) -->"
EVIDENCE_END = "<!-- measured:end -->"
# What each JSON measures, and the command that wrote it where the JSON does not record one.
MEASURED = {
    "benchmark.json": ("memory at start-up, start-up time, throughput; 2K to 10M contexts", ""),
    "bench_serving.json": ("serving throughput and latency with upstream's bench_serving", ""),
    "bench_serving_growth.json": ("the cost of committing and releasing while serving", ""),
    "bench_serving_growth_cache_kept.json": ("the same, the prefix cache kept", ""),
    "allocator_micro.json": (
        "allocator cost per scheduler step, segmented / upstream",
        "python benchmark/allocator_micro.py --out docs/runs/",
    ),
    "allocator_before_after.json": (
        "the segmented allocator's cost per step before and after the restructuring of "
        "issue 33 (head / base, two checkouts in turn)",
        "python benchmark/allocator_before_after.py --base 3f36f7b^ --rounds 4 --steps 1000",
    ),
    "one_batch.json": (
        "decode and prefill latency in-process (upstream's one_batch)",
        "python benchmark/one_batch_compare.py --out docs/runs --rounds 6 --repeats 3",
    ),
    "soak.json": (
        "10 minutes of 8 clients: no leak, memory returned",
        "python benchmark/soak.py --out docs/runs/",
    ),
}


def evidence_section(docs: Path) -> str:
    """The measured figures' sources for docs/evidence.md: JSON, command, commit."""
    lines = [
        EVIDENCE_BEGIN,
        "| measures | JSON | command | measured on |",
        "|---|---|---|---|",
    ]
    for name, (what, default_command) in MEASURED.items():
        data = _load(docs / name)
        if data is None:
            continue
        command = (
            data.get("provenance", {}).get("command") or data.get("command") or default_command
        )
        lines.append(
            f"| {what} | [runs/{name}](runs/{name}) | `{command}` | "
            f"{provenance.staleness(data, docs / name)} |"
        )
    for path in sorted((docs.parent / "gpu-runs").glob("*.json")):
        data = json.loads(path.read_text())
        lines.append(
            f"| the GPU suite on an H100 (`bash test/gpu/run.sh`) | "
            f"[gpu-runs/{path.name}](gpu-runs/{path.name}) | `bash test/gpu/run.sh` | "
            f"{provenance.staleness(data, path)} |"
        )
    return "\n".join([*lines, EVIDENCE_END])


def _replace_section(path: Path, begin: str, end: str, section: str) -> None:
    text = path.read_text()
    head, rest = text.split(begin, 1)
    path.write_text(head + section + rest.split(end, 1)[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=Path, default=Path("docs/runs"))
    args = parser.parse_args(argv)
    path = args.docs / "benchmark.md"
    text = path.read_text()
    section = render(args.docs)
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head.rstrip("\n") + "\n" + rest.split(END, 1)[1].lstrip("\n")
    # Right under the title: the CPU benchmark's own "no GPU" header follows it.
    title, _, rest = text.partition("\n")
    text = title + "\n\n" + section + "\n\n" + rest.lstrip("\n")
    path.write_text(text)
    print(f"wrote the goals section of {path}")
    evidence = args.docs.parent / "evidence.md"
    if evidence.exists() and EVIDENCE_BEGIN in evidence.read_text():
        _replace_section(evidence, EVIDENCE_BEGIN, EVIDENCE_END, evidence_section(args.docs))
        print(f"wrote the measured section of {evidence}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
