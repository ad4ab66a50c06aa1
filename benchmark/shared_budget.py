"""Two real-model servers on one KV budget against two static servers on a half each, side by
side on the CPU engine (issue 37): the throughput of bursts that go to one server while the
other idles, and how long a request waits for the other server to give way.

    python benchmark/shared_budget.py [--rounds 3] [--out docs/runs/shared_budget.json]

Each round, both pairs in turn, one server awake at a time (an idle CPU-engine scheduler
busy-polls a core): a burst of concurrent requests to the first server, then one to the
second; the throughput is new tokens over the burst's wall time. Then, on the shared pair,
both awake: the second's long request arrives while the first serves one; it waits (its
ledger row wants bytes) until the first finishes and gives its memory back: from the first's
response to the end of that wait is how soon memory freed on one server serves the other.
(Giving back *cached* KV to a waiting server is tested end to end, test_shared_budget.py.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
import urllib.error
from pathlib import Path
from typing import Any

import provenance  # benchmark/, the script's own folder

MIB = 1 << 20
BUDGET_BYTES = 100 * MIB
BURST_REQUESTS = 4
PROMPT_TOKENS = 600  # a static half holds one such request at a time, the budget three
NEW_TOKENS = 16
LONG_PROMPT_TOKENS = 1500  # one fits the budget beside the other's retained KV; two do not
# The first server's request: its decode stays inside the segments its prefill committed
# (1,420..1,468 of the 128-token segment 1,408..1,535), so it never needs the budget while the
# second waits (a decode that does can find the budget taken: see docs/multi-model.md).
FIRST_PROMPT_TOKENS = 1420
FIRST_NEW_TOKENS = 48
SECOND_AFTER_S = 4.0  # when the second's request arrives (the first is in its prefill)
COMMON_ARGS = ["--dtype", "float32"]


def kv_bytes_per_token(model: Path) -> int:
    """float32 K and V of every layer, from the model's config."""
    config = json.loads((model / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    return config["num_hidden_layers"] * 2 * kv_heads * head_dim * 4


def prompt(seed: int, tokens: int) -> list[int]:
    return [(i * 7919 + seed * 104_729) % 40_000 + 100 for i in range(tokens)]


def burst(server: Any, seed: int) -> dict[str, float]:
    """``BURST_REQUESTS`` requests at once: wall time and new tokens per second."""
    from sglang_kvalloc_harness.serving import generate_concurrently

    params = {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
    payloads = [
        {"input_ids": prompt(seed * 100 + i, PROMPT_TOKENS), "sampling_params": params}
        for i in range(BURST_REQUESTS)
    ]
    started = time.perf_counter()
    results, errors = generate_concurrently(server, payloads)
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
    tokens = sum(len(r["output_ids"]) for r in results)
    return {"wall_s": wall, "tokens_per_s": tokens / wall}


def settle(*servers: Any) -> None:
    """Flush the servers' caches and let them give their segments back (no hold-off) before
    they are paused: a server stopped in the middle of a ledger change holds its lock, and
    the others' reservations are refused until it runs again."""
    from sglang_kvalloc_harness.serving import http_text

    for server in servers:
        http_text(server.url + "/flush_cache")
    time.sleep(1.0)


def burst_alone(server: Any, seed: int) -> dict[str, float]:
    """A burst on ``server`` with the rest paused (an idle CPU-engine scheduler busy-polls a
    core and slows a busy one eightfold); then its cache flushed and, with no hold-off, its
    segments given back before it is paused again, so the other server of its pair starts
    from the same budget."""

    with server.awake():
        result = burst(server, seed)
        settle(server)
    return result


def long_request_s(server: Any, seed: int) -> float:
    params = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
    started = time.perf_counter()
    server.generate({"input_ids": prompt(seed, LONG_PROMPT_TOKENS), "sampling_params": params})
    return time.perf_counter() - started


def long_request_outcome(server: Any) -> str:
    """What a static half does with the long request the shared budget serves."""
    try:
        seconds = long_request_s(server, 7)
    except urllib.error.HTTPError as exc:  # the outcome is the measurement
        return f"refused: HTTP {exc.code}: {exc.read().decode()[:300]}"
    return f"served in {seconds:.1f} s"


def wanted_spans(path: Path, pid: int, stop: threading.Event) -> list[tuple[float, float]]:
    """(start, end) of each span in which ``pid``'s row of the ledger wanted bytes (a refused
    reservation: it waits for memory), sampled every 5 ms, on the perf_counter clock."""
    from sglang.srt.mem_cache.segmented.shared_budget import read_ledger

    spans: list[tuple[float, float]] = []
    since = None
    while not stop.is_set():
        ledger, _ = read_ledger(path)
        wanted = any(slot.pid == pid and slot.wanted for slot in ledger.slots)
        now = time.perf_counter()
        if wanted and since is None:
            since = now
        elif not wanted and since is not None:
            spans.append((since, now))
            since = None
        time.sleep(0.005)
    return spans


def freed_elsewhere_round(first: Any, second: Any, seed: int) -> dict[str, Any]:
    """The second server's long request arrives while the first serves one (its KV in use):
    the second's reservation waits (its ledger row wants bytes) until the first finishes and
    gives its memory back (no hold-off). The figure: from the first's response to the end of
    the second's wait, i.e. how soon memory freed on one server serves the other."""
    from concurrent.futures import ThreadPoolExecutor

    budget = second.server_info()["internal_states"][0]["kv_alloc"]["budget"]
    path = Path(budget["path"])
    (pid,) = {slot["pid"] for slot in budget["slots"]} & set(second.pids())
    stop = threading.Event()
    params = {"max_new_tokens": FIRST_NEW_TOKENS, "temperature": 0, "ignore_eos": True}
    with ThreadPoolExecutor(3) as pool:
        spans = pool.submit(wanted_spans, path, pid, stop)
        first_done = pool.submit(
            lambda: (first.generate({"input_ids": prompt(seed, FIRST_PROMPT_TOKENS),
                                     "sampling_params": params}), time.perf_counter())[1]
        )  # fmt: skip
        time.sleep(SECOND_AFTER_S)
        second_s = long_request_s(second, seed + 1)
        stop.set()
        first_finished, waits = first_done.result(), spans.result()
    settle(first, second)
    return {"second_request_s": second_s,
            "reservation_wait_spans_s": [round(end - start, 3) for start, end in waits],
            "waited_s": sum(end - start for start, end in waits),
            "freed_to_served_s": waits[-1][1] - first_finished if waits else None}  # fmt: skip


def spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    from sglang_kvalloc_harness.real_model import MODEL_NAME, ensure
    from sglang_kvalloc_harness.serving import LocalServer, side_by_side

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    models = Path.home() / ".cache/sglang-kvalloc/models"
    parser.add_argument("--model-dir", type=Path, default=models / MODEL_NAME)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model = ensure(args.model_dir)
    half_tokens = BUDGET_BYTES // 2 // kv_bytes_per_token(model)
    budget = f"bench-{os.getpid()}"
    shared_args = ["--kv-alloc-mode", "segmented", "--kv-segment-tokens", "128",
                   "--kv-idle-cache-tokens", "256", "--kv-segment-hold-off", "0",
                   "--kv-budget", budget,
                   "--kv-budget-bytes", str(BUDGET_BYTES), *COMMON_ARGS]  # fmt: skip
    static_args = ["--kv-alloc-mode", "static", "--max-total-tokens", str(half_tokens),
                   *COMMON_ARGS]  # fmt: skip
    pairs = {
        "static_halves": [LocalServer(model, args=static_args) for _ in range(2)],
        "shared_budget": [LocalServer(model, args=shared_args) for _ in range(2)],
    }
    bursts: dict[str, list[float]] = {name: [] for name in pairs}
    ratios: list[float] = []
    waits: list[dict[str, Any]] = []
    with side_by_side([server for pair in pairs.values() for server in pair]):
        for round_index in range(args.rounds):
            rates: dict[str, float] = {}
            for name, pair in pairs.items():
                runs = [burst_alone(server, 2 * round_index + i) for i, server in enumerate(pair)]
                rates[name] = statistics.mean(r["tokens_per_s"] for r in runs)
                print(f"round {round_index} {name}: {[round(r['wall_s'], 1) for r in runs]} s",
                      flush=True)  # fmt: skip
                bursts[name].extend(r["tokens_per_s"] for r in runs)
            ratios.append(rates["shared_budget"] / rates["static_halves"])
            first, second = pairs["shared_budget"]
            with first.awake(), second.awake():
                waits.append(freed_elsewhere_round(first, second, 1000 + round_index * 10))
            print(f"round {round_index} give way: {waits[-1]}", flush=True)
        with pairs["static_halves"][0].awake() as half:
            long_on_a_static_half = long_request_outcome(half)
    out = {
        "provenance": provenance.record("benchmark/shared_budget.py"),
        "setup": {
            "model": MODEL_NAME,
            "budget_bytes": BUDGET_BYTES,
            "static_half_tokens": half_tokens,
            "burst_requests": BURST_REQUESTS,
            "prompt_tokens": PROMPT_TOKENS,
            "new_tokens": NEW_TOKENS,
            "long_prompt_tokens": LONG_PROMPT_TOKENS,
            "rounds": args.rounds,
            "shared_args": shared_args,
            "static_args": static_args,
        },  # fmt: skip
        "summary": {
            "long_request_on_a_static_half": long_on_a_static_half,
            "burst_tokens_per_s": {name: spread(values) for name, values in bursts.items()},
            "shared_over_static_throughput": spread(ratios),
            "reservation_waited_s": spread([w["waited_s"] for w in waits]),
            "freed_to_served_s": spread(
                [w["freed_to_served_s"] for w in waits if w["freed_to_served_s"] is not None]
            ),
        },
        "rounds": {"bursts": bursts, "ratios": ratios, "give_way": waits},
    }
    print(json.dumps(out["summary"], indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
