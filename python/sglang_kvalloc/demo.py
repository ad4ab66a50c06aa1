"""The main job: serve the built-in tiny model on the CPU with `--kv-alloc-mode auto` and a
10M-token context, with upstream's default pool, exactly as a new user types it; then again
with upstream's override for contexts past the model's maximum. Each server answers a few
requests; the demo prints the answers, the mode auto chose and why, the context, the memory
figures, and shows the segments given back once the server is idle.

    python -m sglang_kvalloc.demo [--model-dir models/tiny-llama] [--context-length 10000000]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sglang_kvalloc.serving import LocalServer, free_port, http_json
from sglang_kvalloc.tiny_model import ensure

PROMPTS = [
    "Hello world",
    "The memory cache of the",
    "Kato rime suna lope",
]
OVERRIDE = "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"
DEFAULT_HOLD_OFF_S = 5.0
SHORT_HOLD_OFF_S = 2.0


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:,.1f} MB"


def _kv(server: LocalServer) -> dict:
    return server.server_info()["internal_states"][0]["kv_alloc"]


def _serve(
    title: str, model: Path, args: list[str], env: dict[str, str], hold_off_s: float
) -> None:
    server = LocalServer(model, args=args, env=env, port=free_port())
    env_text = " ".join(f"{k}={v}" for k, v in env.items())
    print(f"\n[demo] == {title} ==")
    print(f"[demo] launching: {env_text + ' ' if env_text else ''}{' '.join(server.command()[1:])}")
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
        # A burst of long prompts grows the committed KV; idle, the segments go back.
        burst = [[(i * 7 + j) % 2000 + 3 for j in range(20_000)] for i in range(3)]
        for prompt in burst:
            server.generate({"input_ids": prompt, "sampling_params": {"max_new_tokens": 2}})
        after_burst = (_kv(server).get("segments") or {}).get("committed_bytes")
        time.sleep(hold_off_s + 2)

        kv = _kv(server)
        print("[demo] kv_alloc (from the scheduler):")
        print(json.dumps(kv, indent=2))
        segments = kv.get("segments") or {}
        print(
            f"[demo] memory: server RSS {_mb(server.rss_bytes())}; "
            f"KV committed {_mb(segments.get('committed_bytes'))} of "
            f"{_mb(segments.get('reserved_bytes'))} reserved "
            f"({_mb(after_burst)} right after a 60,000-token burst); "
            f"req_to_token {'reserved' if segments else 'allocated'} "
            f"{_mb(kv['req_to_token_bytes'])}"
            f", resident {_mb(segments.get('req_to_token_resident_bytes'))}"
        )
        print(
            f"[demo] context: requested {kv['requested_context_length']:,}, "
            f"effective {kv['effective_context_length']:,}; KV capacity "
            f"{kv['token_capacity']:,} tokens (upstream's default pool); mode {kv['mode']}"
        )
    print("[demo] server stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path("models/tiny-llama"))
    parser.add_argument("--context-length", type=int, default=10_000_000)
    parser.add_argument("--mode", default="auto", choices=["auto", "static", "segmented"])
    args = parser.parse_args(argv)

    print(f"[demo] building the tiny model in {args.model_dir} (offline, fixed seed)")
    model = ensure(args.model_dir, dtype="float32")
    flags = ["--kv-alloc-mode", args.mode, "--context-length", str(args.context_length)]
    _serve(
        "as a new user types it: no other flags, upstream's default pool",
        model,
        flags,
        {},
        DEFAULT_HOLD_OFF_S,
    )
    # Only to keep the demo short: segments go back after 2 s idle instead of 5 s.
    _serve(
        f"past the model's 65,536 positions with upstream's override ({OVERRIDE}=1)",
        model,
        flags + ["--kv-segment-hold-off", str(SHORT_HOLD_OFF_S)],
        {OVERRIDE: "1"},
        SHORT_HOLD_OFF_S,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
