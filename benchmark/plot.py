"""Plots of the benchmark JSON files, with matplotlib (`pip install -e 'python[benchmark]'`).

`render_png` draws benchmark.png for bench_kv_alloc.py: resident memory and start-up time per
context and mode, and the segmented/static throughput ratios with their per-round spread and
the 0.99 target. `render_allocator_png` draws allocator_micro.png: segmented/upstream time per
scheduler step for every pool size, page size and trace.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

MODE_COLORS = {"static": "#466ebe", "segmented": "#eb8c28"}
PHASE_COLORS = {"prefill": "#5aa05a", "decode": "#965aaa"}


def context_label(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}K"
    return str(n)


def _mode_bars(ax: Any, startup: list[dict[str, Any]], value: Any, unit: str) -> None:
    contexts = sorted({r["context"] for r in startup})
    width = 0.38
    for j, mode in enumerate(("static", "segmented")):
        for i, ctx in enumerate(contexts):
            rec = next((r for r in startup if r["context"] == ctx and r["mode"] == mode), None)
            x = i + (j - 0.5) * width
            if rec is None:
                continue
            if not rec["started"]:
                ax.bar(x, 0, width, color=MODE_COLORS[mode])
                ax.annotate("failed", (x, 0), ha="center", va="bottom", color="#c82828",
                            rotation=90, xytext=(0, 3), textcoords="offset points")  # fmt: skip
                continue
            v = value(rec)
            ax.bar(x, v, width, color=MODE_COLORS[mode], label=mode if i == 0 else None)
            ax.annotate(f"{v:.1f}", (x, v), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 2), textcoords="offset points")  # fmt: skip
    ax.set_xticks(range(len(contexts)), [context_label(c) for c in contexts])
    ax.set_xlabel("context length")
    ax.set_ylabel(unit)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(frameon=False)


def render_png(data: dict[str, Any], path: Path) -> None:
    """benchmark.png from bench_kv_alloc.py's JSON."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2), constrained_layout=True)
    startup = data["startup"]
    axes[0].set_title("Resident memory after start-up (all processes)")
    _mode_bars(axes[0], startup, lambda r: r["rss_bytes"] / 1e9, "GB")
    axes[1].set_title("Start-up: launch to first /health 200")
    _mode_bars(axes[1], startup, lambda r: r["startup_s"], "seconds")

    ax = axes[2]
    ax.set_title("Throughput, segmented / static")
    tps = [t for t in data["throughput"] if "ratio_segmented_over_static" in t]
    width = 0.38
    for i, t in enumerate(tps):
        for j, phase in enumerate(("prefill", "decode")):
            median = t["ratio_segmented_over_static"][phase]
            rounds = [r[phase] for r in t.get("per_round_ratio", [])]
            x = i + (j - 0.5) * width
            err = (
                [[median - min(rounds)], [max(rounds) - median]] if rounds else None
            )  # per-round spread
            ax.bar(x, median - 1.0, width, bottom=1.0, color=PHASE_COLORS[phase],
                   yerr=err, capsize=4, label=phase if i == 0 else None)  # fmt: skip
            ax.annotate(f"{median:.3f}", (x, max(median, 1.0)), ha="center", va="bottom",
                        fontsize=8, xytext=(0, 2), textcoords="offset points")  # fmt: skip
    ax.axhline(1.0, color="#1e1e1e", linewidth=1)
    ax.axhline(0.99, color="#c82828", linestyle="--", linewidth=1, label="target 0.99")
    ax.set_xticks(range(len(tps)), [f"context {context_label(t['context'])}" for t in tps])
    ax.set_ylabel("ratio (median; whiskers: per-round min-max)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(frameon=False)
    m = data["machine"]
    fig.suptitle(
        f"--kv-alloc-mode static vs segmented, SGLang CPU engine, tiny Llama; "
        f"{m.get('logical_cpus', '?')} cores, no GPU; {data['started_at']}",
        fontsize=10,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_allocator_png(result: dict[str, Any], path: Path) -> None:
    """allocator_micro.png from allocator_micro.py's JSON: the per-step ratio with its spread."""
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(11, 4.8), constrained_layout=True)
    labels, medians, lows, highs, colors = [], [], [], [], []
    for r in rows:
        labels.append(f"{r['pool_tokens'] // 1024:,}K p{r['page_size']}\n{r['trace']}")
        ratio = r["ratio_segmented_over_upstream"]
        lo, med, hi = ratio["min"], ratio["median"], ratio["max"]
        medians.append(med)
        lows.append(med - lo)
        highs.append(hi - med)
        colors.append(PHASE_COLORS["decode" if r["trace"] == "decode" else "prefill"])
    xs = range(len(rows))
    ax.bar(xs, medians, color=colors, yerr=[lows, highs], capsize=3)
    ax.axhline(1.0, color="#1e1e1e", linewidth=1)
    ax.axhline(1.1, color="#c82828", linestyle="--", linewidth=1, label="goal 1.1x")
    ax.set_yscale("log")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("segmented / upstream time per step (log)")
    ax.set_title("Allocator per scheduler step: segmented against upstream (same traces)")
    ax.legend(frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)
