"""The main job: serve the built-in tiny model on the CPU with `--kv-alloc-mode auto` and a
10M-token context, send a few requests, print the answers and the memory figures, stop.

    python -m sglang_kvalloc.demo [--model-dir models/tiny-llama] [--context-length 10000000]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sglang_kvalloc.serving import LocalServer, free_port, http_json
from sglang_kvalloc.tiny_model import ensure

PROMPTS = [
    "Hello world",
    "The memory cache of the",
    "Kato rime suna lope",
]


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:,.1f} MB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path("models/tiny-llama"))
    parser.add_argument("--context-length", type=int, default=10_000_000)
    parser.add_argument("--max-total-tokens", type=int, default=65536)
    parser.add_argument("--mode", default="auto", choices=["auto", "static", "segmented"])
    args = parser.parse_args(argv)

    print(f"[demo] building the tiny model in {args.model_dir} (offline, fixed seed)")
    model = ensure(args.model_dir, dtype="float32")
    server = LocalServer(
        model,
        args=[
            "--kv-alloc-mode",
            args.mode,
            "--context-length",
            str(args.context_length),
            "--max-total-tokens",
            str(args.max_total_tokens),
            "--dtype",
            "float32",
        ],
        # The tiny model declares 65,536 positions; upstream asks for this to go beyond.
        env={"SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN": "1"},
        port=free_port(),
    )
    print(f"[demo] launching: {' '.join(server.command()[1:])}")
    with server:
        print(f"[demo] server up at {server.url} (log: {server.log_path})")
        for line in server.log().splitlines():
            if "kv-alloc-mode auto" in line or "KV allocation mode" in line:
                print("[demo] log:", line.split("] ", 1)[-1])
        for prompt in PROMPTS:
            out = server.generate(
                {"text": prompt, "sampling_params": {"max_new_tokens": 16, "temperature": 0}}
            )
            print(f"[demo] {prompt!r} -> {out['text']!r}")
        completion = http_json(
            server.url + "/v1/completions",
            {"model": "default", "prompt": "Hello", "max_tokens": 8, "temperature": 0},
        )
        print(f"[demo] /v1/completions 'Hello' -> {completion['choices'][0]['text']!r}")

        info = server.server_info()
        kv = info["internal_states"][0]["kv_alloc"]
        print("[demo] kv_alloc (from the scheduler):")
        print(json.dumps(kv, indent=2))
        segments = kv.get("segments") or {}
        print(
            f"[demo] memory: server RSS {_mb(server.rss_bytes())}; "
            f"KV committed {_mb(segments.get('committed_bytes'))} of "
            f"{_mb(segments.get('reserved_bytes'))} reserved; "
            f"req_to_token {'reserved' if segments else 'allocated'} "
            f"{_mb(kv['req_to_token_bytes'])}"
            f", resident {_mb(segments.get('req_to_token_resident_bytes'))}"
        )
        print(
            f"[demo] context: requested {kv['requested_context_length']:,}, "
            f"effective {kv['effective_context_length']:,}; mode {kv['mode']}"
        )
    print("[demo] server stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
