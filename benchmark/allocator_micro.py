"""Allocator microbenchmark (not a CI test): upstream's token / paged allocators against the
segmented ones, in-process, on the same scheduler-like alloc/free traces.

A trace replays what the scheduler asks of the allocator: requests arrive with a prompt
(prefill: `alloc(n)` at page size 1, `alloc_extend` above), every running request takes one
slot per decode step (`alloc(bs)` / `alloc_decode`), finished requests free all their slots.
The segmented allocator also gets its per-iteration `scheduler_step` (commit ahead, shrink
check), timed as part of its cost. Reported: ns per allocator call by kind and per step in
total, the median of interleaved repeats with their spread, and the ratio segmented/upstream.

    python benchmark/allocator_micro.py --out docs/runs/ [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import provenance  # benchmark/, the script's own folder
import torch
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.segmented.buffers import SegmentedBuffers
from sglang.srt.mem_cache.segmented.cpu_backing import CpuBackingFactory
from sglang.srt.mem_cache.segmented.geometry import SegmentGeometry
from sglang.srt.mem_cache.segmented.kv_allocators import (
    SegmentedPagedTokenToKVPoolAllocator,
    SegmentedTokenToKVPoolAllocator,
)
from sglang.srt.mem_cache.segmented.runtime import RUNTIME

SEGMENT_TOKENS = 4096
ROW_BYTES = 1  # one byte per token and buffer: the backing is exercised, memory stays small


@dataclass
class Trace:
    """A replayable request schedule: per step, the arrivals' prompt lengths; per request,
    its number of decode steps."""

    name: str
    arrivals: list[list[int]]
    decode_steps: dict[int, int]


def make_trace(name: str, pool_tokens: int, steps: int, seed: int) -> Trace:
    rng = random.Random(seed)
    if name == "decode":  # a steady batch of long decodes, arrivals few
        batch, prompt, out = 64, (256, 2048), (256, 1024)
    else:  # prefill-heavy: many arrivals with long prompts, short outputs
        batch, prompt, out = 16, (2048, 16384), (4, 64)
    # Keep the live set well inside the pool, so both allocators always succeed.
    batch = max(1, min(batch, pool_tokens // (2 * (prompt[1] + out[1]))))
    arrivals: list[list[int]] = []
    decode_steps: dict[int, int] = {}
    live = 0
    rid = 0
    ends: list[int] = []
    for step in range(steps):
        ends = [e for e in ends if e > step]
        live = len(ends)
        new = []
        while live + len(new) < batch:
            new.append(rng.randint(*prompt))
            n_out = rng.randint(*out)
            decode_steps[rid] = n_out
            ends.append(step + 1 + n_out)
            rid += 1
        arrivals.append(new)
    return Trace(name, arrivals, decode_steps)


@dataclass
class Timings:
    ns: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, ns: int) -> None:
        self.ns[kind] = self.ns.get(kind, 0) + ns
        self.calls[kind] = self.calls.get(kind, 0) + 1


def build(impl: str, pool_tokens: int, page_size: int):
    if impl == "upstream":
        if page_size == 1:
            return TokenToKVPoolAllocator(pool_tokens, torch.int64, "cpu", None, False)
        return PagedTokenToKVPoolAllocator(pool_tokens, page_size, torch.int64, "cpu", None, False)
    geometry = SegmentGeometry(pool_tokens + page_size, SEGMENT_TOKENS, page_size)
    kv = types.SimpleNamespace(
        segmented_buffers=SegmentedBuffers.create(
            geometry, [ROW_BYTES, ROW_BYTES], CpuBackingFactory()
        )
    )
    if page_size == 1:
        return SegmentedTokenToKVPoolAllocator(pool_tokens, torch.int64, "cpu", kv, False)
    return SegmentedPagedTokenToKVPoolAllocator(
        pool_tokens, page_size, torch.int64, "cpu", kv, False
    )


def replay(impl: str, trace: Trace, pool_tokens: int, page_size: int) -> tuple[Timings, Timings]:
    """The trace twice on one allocator: cold (a fresh pool: segmented commits as it grows)
    and steady (the same trace again after every request of the first pass has finished,
    so the allocators' state is that of a server already running; segmented keeps its
    segments through the hold-off)."""
    alloc = build(impl, pool_tokens, page_size)
    return run_trace(alloc, trace, page_size), run_trace(alloc, trace, page_size)


def run_trace(alloc, trace: Trace, page_size: int) -> Timings:
    """Replay ``trace`` timing every allocator call; free what is still live at the end."""
    step_hook = getattr(alloc, "scheduler_step", None)
    t = Timings()
    clock = time.perf_counter_ns
    slots: dict[int, list[torch.Tensor]] = {}  # request -> its slot chunks
    lens: dict[int, int] = {}
    left: dict[int, int] = {}
    rid = 0
    for new in trace.arrivals:
        demand = sum(new) + len(slots)
        if step_hook is not None:
            t0 = clock()
            step_hook(demand)
            t.add("scheduler_step", clock() - t0)
        # Prefill the arrivals, one batch.
        if new:
            if page_size == 1:
                t0 = clock()
                out = alloc.alloc(sum(new))
                t.add("alloc_prefill", clock() - t0)
            else:
                zeros = torch.zeros(len(new), dtype=torch.int64)
                seq = torch.tensor(new, dtype=torch.int64)
                last = torch.full((len(new),), -1, dtype=torch.int64)
                t0 = clock()
                out = alloc.alloc_extend(zeros, zeros, seq, seq, last, sum(new))
                t.add("alloc_extend", clock() - t0)
            assert out is not None, "the trace keeps the live set inside the pool"
            at = 0
            for n in new:
                slots[rid] = [out[at : at + n]]
                lens[rid] = n
                left[rid] = trace.decode_steps[rid]
                at += n
                rid += 1
        # One decode step for every running request.
        running = list(slots)
        if running:
            if page_size == 1:
                t0 = clock()
                out = alloc.alloc(len(running))
                t.add("alloc_decode", clock() - t0)
            else:
                seq = torch.tensor([lens[r] + 1 for r in running], dtype=torch.int64)
                last = torch.stack([slots[r][-1][-1] for r in running])
                t0 = clock()
                out = alloc.alloc_decode(seq, seq, last)
                t.add("alloc_decode", clock() - t0)
            assert out is not None
            for i, r in enumerate(running):
                slots[r].append(out[i : i + 1])
                lens[r] += 1
                left[r] -= 1
        # Finished requests free their slots (upstream frees them as one tensor per request,
        # inside a free group per batch).
        done = [r for r in running if left[r] <= 0]
        if done:
            t0 = clock()
            alloc.free_group_begin()
            for r in done:
                alloc.free(torch.cat(slots.pop(r)))
                del lens[r], left[r]
            alloc.free_group_end()
            t.add("free", clock() - t0)
    for chunks in slots.values():
        alloc.free(torch.cat(chunks))
    return t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/runs"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument(
        "--pool-tokens", type=int, nargs="+", default=[65_536, 1_048_576, 8_388_608]
    )
    parser.add_argument("--from-json", type=Path, help="only re-render md/png from this JSON")
    args = parser.parse_args(argv)
    if args.from_json:
        write_outputs(json.loads(args.from_json.read_text()), args.out)
        return 0
    torch.set_num_threads(1)
    RUNTIME.settings.hold_off_s = 5.0

    rows = []
    for pool in args.pool_tokens:
        for page_size in (1, 16):
            for name in ("decode", "prefill"):
                trace = make_trace(name, pool, args.steps, seed=pool + page_size)
                per: dict[str, list[Timings]] = {"upstream": [], "segmented": []}
                cold: dict[str, list[Timings]] = {"upstream": [], "segmented": []}
                for _ in range(args.repeats):  # interleaved, so drift hits both alike
                    for impl in ("upstream", "segmented"):
                        first, second = replay(impl, trace, pool, page_size)
                        cold[impl].append(first)
                        per[impl].append(second)
                row = {"pool_tokens": pool, "page_size": page_size, "trace": name}
                row["cold"] = {
                    impl: _spread([sum(r.ns.values()) / args.steps for r in runs])
                    for impl, runs in cold.items()
                }
                row["cold"]["ratio_segmented_over_upstream"] = _spread(
                    [
                        sum(s.ns.values()) / sum(u.ns.values())
                        for u, s in zip(cold["upstream"], cold["segmented"], strict=True)
                    ]
                )
                for impl, runs in per.items():
                    kinds = sorted(runs[0].ns)
                    row[impl] = {
                        k: {
                            "calls": runs[0].calls[k],
                            "ns_per_call": statistics.median(r.ns[k] / r.calls[k] for r in runs),
                        }
                        for k in kinds
                    }
                    row[impl]["ns_per_step"] = _spread(
                        [sum(r.ns.values()) / args.steps for r in runs]
                    )
                row["ratio_segmented_over_upstream"] = _spread(
                    [
                        sum(s.ns.values()) / sum(u.ns.values())
                        for u, s in zip(per["upstream"], per["segmented"], strict=True)
                    ]
                )
                rows.append(row)
                r = row["ratio_segmented_over_upstream"]
                c = row["cold"]["ratio_segmented_over_upstream"]
                print(
                    f"pool {pool:>9} page {page_size:>2} {name:<7} upstream "
                    f"{row['upstream']['ns_per_step']['median'] / 1e3:8.1f} us/step, segmented "
                    f"{row['segmented']['ns_per_step']['median'] / 1e3:8.1f} us/step, ratio "
                    f"{r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}] (cold {c['median']:.3f})",
                    flush=True,
                )
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "provenance": provenance.record("benchmark/allocator_micro.py"),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": "CPU only, torch threads 1",
        "torch": torch.__version__,
        "steps": args.steps,
        "repeats": args.repeats,
        "segment_tokens": SEGMENT_TOKENS,
        "rows": rows,
    }
    (args.out / "allocator_micro.json").write_text(json.dumps(result, indent=1))
    write_outputs(result, args.out)
    return 0


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def write_outputs(result: dict, out: Path) -> None:
    from plot import render_allocator_png

    (out / "allocator_micro.md").write_text(render(result))
    render_allocator_png(result, out / "allocator_micro.png")


def render(result: dict) -> str:
    """docs/runs/allocator_micro.md from the JSON this script writes."""
    lines = [
        "# Allocator microbenchmark: upstream's allocators against the segmented ones",
        "",
        f"Generated by `python benchmark/allocator_micro.py --out docs/runs/` on {result['when']} "
        f"({result['machine']}, torch {result['torch']}): {result['steps']} scheduler "
        f"iterations per trace, {result['repeats']} interleaved repeats, segments of "
        f"{result['segment_tokens']} tokens. No GPU: the CPU backing, allocator bookkeeping "
        "only (no model runs).",
        "",
        "Each trace replays a scheduler's calls: `decode` keeps a batch of long generations "
        "running (one slot per request per step), `prefill` feeds long prompts with short "
        "outputs. Segmented's cost includes its per-iteration `scheduler_step` (commit ahead, "
        "shrink check), which upstream does not have. Upstream's allocators are built as its "
        "server builds them outside disaggregation (`need_sort=False`: frees are appended, "
        "never sorted); segmented keeps its free list sorted lazily (lowest pages first, so "
        "high segments drain and can be given back).",
        "",
        "Every repeat replays the trace twice on one allocator: **steady** is the second pass "
        "(the state of a server already running: segmented has its segments committed), the "
        "table's main columns; **cold** is the first pass on a fresh pool, where segmented "
        "also commits its segments as it grows (a CPU commit probes the memory available, "
        "hundreds of us each; the cost of growth is measured on its own in the growth pair). "
        "Per step: the median of the repeats [min, max]; ratio: segmented / upstream per "
        "repeat pair, median [min, max]. The goal (issue 11) is a steady ratio of 1.1 or less "
        "on every row.",
        "",
        "![segmented / upstream per step](allocator_micro.png)",
        "",
        "| pool tokens | page | trace | upstream us/step | segmented us/step | ratio (steady) "
        "| ratio (cold) |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        up, seg = row["upstream"]["ns_per_step"], row["segmented"]["ns_per_step"]
        r = row["ratio_segmented_over_upstream"]
        cold = row.get("cold", {}).get("ratio_segmented_over_upstream")
        cold_cell = f"{cold['median']:.3f} [{cold['min']:.3f}, {cold['max']:.3f}]" if cold else "-"
        lines.append(
            f"| {row['pool_tokens']:,} | {row['page_size']} | {row['trace']} | "
            f"{up['median'] / 1e3:.1f} [{up['min'] / 1e3:.1f}, {up['max'] / 1e3:.1f}] | "
            f"{seg['median'] / 1e3:.1f} [{seg['min'] / 1e3:.1f}, {seg['max'] / 1e3:.1f}] | "
            f"{r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}] | {cold_cell} |"
        )
    lines += [
        "",
        "Per call (median ns, steady pass), by kind:",
        "",
        "| pool tokens | page | trace | kind | upstream | segmented |",
        "|---:|---:|---|---|---:|---:|",
    ]
    for row in result["rows"]:
        kinds = sorted(set(row["upstream"]) | set(row["segmented"]))
        for kind in kinds:
            if kind == "ns_per_step":
                continue
            cells = []
            for impl in ("upstream", "segmented"):
                entry = row[impl].get(kind)
                cells.append(f"{entry['ns_per_call']:,.0f}" if entry else "-")
            lines.append(
                f"| {row['pool_tokens']:,} | {row['page_size']} | {row['trace']} | {kind} | "
                f"{cells[0]} | {cells[1]} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
