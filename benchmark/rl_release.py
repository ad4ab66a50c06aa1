"""RL's release and resume of memory occupation, static and segmented side by side on the CPU
engine with the real model (issue 35): what a release gives back (the scheduler's resident
memory, and segmented mode's committed bytes), how long release and resume take, and the first
request's latency after resume against a warm one.

    python benchmark/rl_release.py [--rounds 8] [--out docs/runs/rl_release.json]

Each round, on each server in turn (the other paused: an idle CPU-engine scheduler busy-polls
a core): a warm request, release (kv_cache), resume (kv_cache), the first request. Static on
the CPU engine has no torch_memory_saver (it pauses CUDA allocations), so its release gives
nothing back; on a GPU it would give back the KV pool through it (not measured here).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import provenance  # benchmark/, the script's own folder

CONTEXT_ARGS = ["--dtype", "float32", "--max-total-tokens", "65536"]
PROMPT_TOKENS = 3000
NEW_TOKENS = 8


def _timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _scheduler_rss(server: Any) -> int:
    import psutil

    return max(psutil.Process(pid).memory_info().rss for pid in server.pids())


def _committed(server: Any) -> int | None:
    kv = server.server_info()["internal_states"][0]["kv_alloc"]
    return kv.get("segments", {}).get("committed_bytes")


def one_round(server: Any, prompt: list[int]) -> dict[str, Any]:
    from sglang_kvalloc_harness.serving import http_json

    params = {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
    payload = {"input_ids": prompt, "sampling_params": params}
    server.generate(payload)  # fills the cache
    _, warm = _timed(lambda: server.generate({**payload, "input_ids": prompt[:-1] + [7]}))
    rss_busy, committed_busy = _scheduler_rss(server), _committed(server)
    tags = {"tags": ["kv_cache"]}
    _, release = _timed(lambda: http_json(server.url + "/release_memory_occupation", tags))
    rss_released, committed_released = _scheduler_rss(server), _committed(server)
    _, resume = _timed(lambda: http_json(server.url + "/resume_memory_occupation", tags))
    _, first = _timed(lambda: server.generate(payload))
    return {
        "warm_request_s": warm,
        "release_s": release,
        "resume_s": resume,
        "first_request_after_resume_s": first,
        "rss_given_back_bytes": rss_busy - rss_released,
        "committed_before_bytes": committed_busy,
        "committed_released_bytes": committed_released,
    }


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in rounds[0]:
        values = [r[key] for r in rounds if r[key] is not None]
        if values:
            out[key] = {"median": statistics.median(values), "min": min(values),
                        "max": max(values)}  # fmt: skip
    return out


def main() -> None:
    from sglang_kvalloc_harness.real_model import MODEL_NAME, ensure
    from sglang_kvalloc_harness.serving import LocalServer, side_by_side

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    models = Path.home() / ".cache/sglang-kvalloc/models"
    parser.add_argument("--model-dir", type=Path, default=models / MODEL_NAME)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model = ensure(args.model_dir)
    prompt = [(i * 7919) % 40000 + 100 for i in range(PROMPT_TOKENS)]
    servers = {
        "static": LocalServer(model, args=["--kv-alloc-mode", "static", *CONTEXT_ARGS]),
        "segmented": LocalServer(model, args=["--kv-alloc-mode", "segmented", *CONTEXT_ARGS]),
    }
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    with side_by_side(servers.values()):
        for _ in range(args.rounds):
            for name, server in servers.items():  # the same order each round: both warm
                with server.awake():
                    results[name].append(one_round(server, prompt))
    out = {
        "provenance": provenance.record("benchmark/rl_release.py"),
        "setup": {
            "model": MODEL_NAME,
            "args": CONTEXT_ARGS,
            "prompt_tokens": PROMPT_TOKENS,
            "new_tokens": NEW_TOKENS,
            "rounds": args.rounds,
        },  # fmt: skip
        "summary": {name: summarize(rounds) for name, rounds in results.items()},
        "rounds": results,
    }
    text = json.dumps(out, indent=1)
    print(json.dumps(out["summary"], indent=1))
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
