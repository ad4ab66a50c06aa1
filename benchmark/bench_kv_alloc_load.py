"""The requests bench_kv_alloc.py sends: random prompts, sent as one concurrent batch, and the
prefill and decode throughput measured from them.

Apart from the server handling so the load itself is easy to read and to change.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import random
import time
from typing import Any

from sglang_kvalloc_harness.serving import LocalServer


def random_prompts(seed: int, n: int, length: int, vocab: int) -> list[list[int]]:
    """`n` prompts of `length` random token ids, the same for the same seed."""
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
    """cfg.prefill_batches batches of cfg.batch prompts of cfg.prefill_len tokens, one new token
    each: prompt tokens not served from the cache, per second."""
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
    """One batch of cfg.batch short prompts generating cfg.decode_tokens each (ignoring EOS):
    generated tokens per second, the short prefill included."""
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
