"""Soak test of a segmented server (not a CI test): 8 concurrent clients for 10 minutes.

Random prompts of 1 to 16K tokens (a share of them on shared prefixes), random
`max_new_tokens`, one request in ten abandoned by its client after the first streamed chunk;
upstream's strict idle leak check on. Reports requests served, errors, peak and final
committed bytes and RSS, and whether memory came back once the idle policy ran.

    python benchmark/soak.py --out docs/runs/ [--minutes 10] [--clients 8]
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from pathlib import Path

import provenance  # benchmark/, the script's own folder
import requests

from sglang_kvalloc_harness.serving import LocalServer
from sglang_kvalloc_harness.tiny_model import ensure

STRICT = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}
VOCAB = 2048
PREFIXES = 4
PREFIX_TOKENS = 2048
SHARED_SHARE = 0.3
ABANDON_SHARE = 0.1
MAX_PROMPT = 16_384
MAX_NEW = 128


class Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.served = 0
        self.abandoned = 0
        self.errors: list[str] = []
        self.prompt_tokens = 0
        self.output_tokens = 0
        self.cached_tokens = 0


def _client(url: str, seed: int, stop_at: float, counters: Counters) -> None:
    rng = random.Random(seed)
    prefixes = [
        [random.Random(1000 + i).randrange(3, VOCAB) for _ in range(PREFIX_TOKENS)]
        for i in range(PREFIXES)
    ]
    session = requests.Session()
    while time.monotonic() < stop_at:
        n = rng.randint(1, MAX_PROMPT)
        if rng.random() < SHARED_SHARE and n > PREFIX_TOKENS:
            prompt = rng.choice(prefixes) + [
                rng.randrange(3, VOCAB) for _ in range(n - PREFIX_TOKENS)
            ]
        else:
            prompt = [rng.randrange(3, VOCAB) for _ in range(n)]
        params = {"max_new_tokens": rng.randint(1, MAX_NEW), "temperature": 0}
        abandon = rng.random() < ABANDON_SHARE
        try:
            if abandon:
                payload = {"input_ids": prompt, "sampling_params": params, "stream": True}
                with session.post(url + "/generate", json=payload, stream=True, timeout=600) as r:
                    r.raise_for_status()
                    next(r.iter_lines(), None)  # the first chunk, then the client goes away
                with counters.lock:
                    counters.abandoned += 1
                continue
            r = session.post(
                url + "/generate",
                json={"input_ids": prompt, "sampling_params": params},
                timeout=600,
            )
            r.raise_for_status()
            meta = r.json()["meta_info"]
            with counters.lock:
                counters.served += 1
                counters.prompt_tokens += meta["prompt_tokens"]
                counters.output_tokens += meta["completion_tokens"]
                counters.cached_tokens += meta.get("cached_tokens", 0)
        except Exception as exc:  # noqa: BLE001 - every failure is a finding
            with counters.lock:
                counters.errors.append(f"{type(exc).__name__}: {exc}"[:300])


def _segments(server: LocalServer) -> dict:
    return server.server_info()["internal_states"][0]["kv_alloc"]["segments"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/runs"))
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--cap-tokens", type=int, default=65_536)
    parser.add_argument("--hold-off", type=float, default=2.0)
    parser.add_argument("--idle-cache-tokens", type=int, default=8192)
    parser.add_argument("--model-dir", type=Path, default=Path("models/tiny-llama"))
    args = parser.parse_args(argv)

    model = ensure(args.model_dir, dtype="float32")
    server_args = [
        "--kv-alloc-mode", "segmented", "--dtype", "float32",
        "--max-total-tokens", str(args.cap_tokens), "--context-length", "32768",
        "--kv-segment-tokens", "2048", "--kv-segment-hold-off", str(args.hold_off),
        "--kv-idle-cache-tokens", str(args.idle_cache_tokens),
    ]  # fmt: skip
    with LocalServer(model, args=server_args, env=STRICT) as server:
        time.sleep(2)
        start = _segments(server)
        start_rss = server.rss_bytes()
        counters = Counters()
        stop_at = time.monotonic() + args.minutes * 60
        threads = [
            threading.Thread(target=_client, args=(server.url, 100 + i, stop_at, counters))
            for i in range(args.clients)
        ]
        began = time.monotonic()
        for t in threads:
            t.start()
        peak = {"committed": start["committed_bytes"], "rss": start_rss}
        samples = []
        while any(t.is_alive() for t in threads):
            seg = _segments(server)
            rss = server.rss_bytes()
            peak["committed"] = max(peak["committed"], seg["committed_bytes"])
            peak["rss"] = max(peak["rss"], rss)
            samples.append((round(time.monotonic() - began, 1), seg["committed_bytes"], rss))
            time.sleep(2)
        for t in threads:
            t.join()
        ran_s = time.monotonic() - began
        right_after = _segments(server)
        time.sleep(args.hold_off + 5)  # the idle policy: evict trailing cache, release
        final = _segments(server)
        final_rss = server.rss_bytes()
        log = server.log()
        segment_bytes = final["committed_bytes"] // max(final["committed_segments"], 1)
        result = {
            "ran_s": round(ran_s, 1),
            "clients": args.clients,
            "cap_tokens": args.cap_tokens,
            "segment_tokens": start["segment_tokens"],
            "segment_bytes": segment_bytes,
            "hold_off_s": args.hold_off,
            "idle_cache_tokens": args.idle_cache_tokens,
            "served": counters.served,
            "abandoned": counters.abandoned,
            "errors": len(counters.errors),
            "error_samples": counters.errors[:5],
            "prompt_tokens": counters.prompt_tokens,
            "output_tokens": counters.output_tokens,
            "cached_tokens": counters.cached_tokens,
            "start_committed_bytes": start["committed_bytes"],
            "peak_committed_bytes": peak["committed"],
            "committed_bytes_when_load_stopped": right_after["committed_bytes"],
            "final_committed_bytes": final["committed_bytes"],
            "reserved_bytes": final["reserved_bytes"],
            "start_rss_bytes": start_rss,
            "peak_rss_bytes": peak["rss"],
            "final_rss_bytes": final_rss,
            "commits": final["commits"],
            "releases": final["releases"],
            "commit_failures": final["commit_failures"],
            # Within one segment, plus the retained cache budget, of the start-up figure.
            "memory_returned": final["committed_bytes"]
            <= start["committed_bytes"]
            + segment_bytes
            + args.idle_cache_tokens * segment_bytes // start["segment_tokens"],
            "leak_reports": log.count("leak detected") + log.count("Mem Leak"),
            "tracebacks": log.count("Traceback"),
            "samples": samples,
        }
    result["provenance"] = provenance.record("benchmark/soak.py")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    return 0 if result["errors"] == 0 and result["leak_reports"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
