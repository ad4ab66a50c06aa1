"""static against segmented with upstream's ``sglang.bench_serving`` (``sglang.benchmark.serving``
through its own command line, in-process), on the same machine in the same call: rounds
alternate which server goes first; per round the segmented/static ratio of each figure; the
median and a 95% t-interval of the mean ratio (on log ratios) over the rounds."""

from __future__ import annotations

import contextlib
import io
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kit_spec
from kit_server import KitServer

# Higher is better for throughputs, lower for latencies; ratios are always segmented/static.
FIGURES = {
    "decode": ("output_throughput", "median_itl_ms", "median_e2e_latency_ms"),
    "prefill": ("input_throughput", "median_ttft_ms"),
}
# Two-sided 95% t quantiles by degrees of freedom, where scipy is missing.
_T95 = {1: 12.71, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}  # fmt: skip


def t95(df: int) -> float:
    try:
        from scipy import stats

        return float(stats.t.ppf(0.975, df))
    except ImportError:
        return _T95[max(k for k in _T95 if k <= df)]


def interval(ratios: list[float]) -> list[float] | None:
    """95% confidence interval of the mean ratio (t on log ratios)."""
    if len(ratios) < 2:
        return None
    logs = [math.log(r) for r in ratios]
    mean, sd = statistics.fmean(logs), statistics.stdev(logs)
    half = t95(len(logs) - 1) * sd / math.sqrt(len(logs))
    return [round(math.exp(mean - half), 4), round(math.exp(mean + half), 4)]


def prefetch() -> None:
    """Import upstream's benchmark ahead (seconds of imports), e.g. while a server starts."""
    kit_spec.ensure_datasets_importable()
    import sglang.benchmark.serving  # noqa: F401


def bench_once(url: str, model: Path, load: dict[str, int], seed: int) -> dict[str, Any]:
    """One ``sglang.bench_serving`` run (random-ids, all requests at once); its figures."""
    kit_spec.ensure_datasets_importable()
    from sglang.benchmark import serving

    with tempfile.NamedTemporaryFile("r", suffix=".jsonl", delete=False) as f:
        out = Path(f.name)
    argv = [
        "bench_serving", "--backend", "sglang", "--base-url", url, "--tokenizer", str(model),
        "--model", str(model), "--dataset-name", "random-ids",
        "--random-input-len", str(load["input_len"]), "--random-output-len",
        str(load["output_len"]), "--random-range-ratio", "1.0",
        "--num-prompts", str(load["prompts"]), "--request-rate", "inf", "--seed", str(seed),
        "--output-file", str(out), "--disable-tqdm",
    ]  # fmt: skip
    saved = sys.argv
    sys.argv = argv
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            serving.cli_main()
    finally:
        sys.argv = saved
    line = out.read_text().strip().splitlines()[-1]
    out.unlink()
    return {k: v for k, v in json.loads(line).items() if not isinstance(v, (list, dict))}


def compare(
    servers: dict[str, KitServer],
    model: Path,
    loads: dict[str, dict[str, int]],
    budget_s: float,
    max_rounds: int,
    pause_others: bool,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    warmup: bool = True,
) -> dict[str, Any]:
    """Rounds of every load on ``servers['static']`` and ``servers['segmented']`` until
    ``max_rounds`` or the budget (a round is not started unless the last one would fit)."""
    started = time.monotonic()
    order = ["static", "segmented"]
    rounds: list[dict[str, Any]] = []
    last = 0.0

    def run(mode: str, name: str, seed: int) -> dict[str, Any]:
        server = servers[mode]
        if pause_others:
            for other in servers.values():
                (other.resume if other is server else other.pause)()
        return bench_once(server.url, model, loads[name], seed)

    for mode in order if warmup else []:  # first requests compile kernels, fault memory in
        for name in loads:
            run(mode, name, seed=1)
    warm = time.monotonic() - started
    while len(rounds) < max_rounds:
        spent = time.monotonic() - started
        if rounds and spent + last * 1.2 > budget_s:
            break
        r0 = time.monotonic()
        first = order if len(rounds) % 2 == 0 else order[::-1]
        record: dict[str, Any] = {"round": len(rounds), "first": first[0]}
        for name in loads:
            record[name] = {mode: run(mode, name, seed=100 + len(rounds)) for mode in first}
        last = time.monotonic() - r0
        record["seconds"] = round(last, 1)
        rounds.append(record)
        if on_round:
            on_round({"rounds": rounds})
    for server in servers.values():
        server.resume()
    return {
        "loads": loads,
        "warmup_seconds": round(warm, 1),
        "rounds": rounds,
        "summary": summarize(rounds, loads),
        "seconds": round(time.monotonic() - started, 1),
    }


def summarize(rounds: list[dict[str, Any]], loads: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in loads:
        for figure in FIGURES.get(name, ()):
            pairs = [
                (r[name]["static"].get(figure), r[name]["segmented"].get(figure)) for r in rounds
            ]
            ratios = [g / s for s, g in pairs if s and g is not None]
            if not ratios:
                continue
            out[f"{name}.{figure}"] = {
                "static_median": statistics.median(s for s, _ in pairs if s),
                "segmented_median": statistics.median(g for _, g in pairs if g is not None),
                "ratio_median": round(statistics.median(ratios), 4),
                "ratio_ci95": interval(ratios),
                "rounds": len(ratios),
            }
    return out
