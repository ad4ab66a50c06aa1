"""The planner's tables in docs/planner.md, generated from the planner itself.

    python scripts/planner_tables.py           # print the tables
    python scripts/planner_tables.py --write   # rewrite them in docs/planner.md

Three tables, each between its markers: ordinary (model default) contexts, 1M and 10M
contexts, and segmented KV per pool kind at 10,485,760 tokens. Every figure is computed (the
planner mirrors upstream's formulas); `test/unit/test_docs.py` fails when a table in
docs/planner.md differs from this, so a planner change cannot leave its figures behind.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sglang_kvalloc.core.planner import GIB, GPU_PRESETS_MIB, MIB, PlanError, PlanInputs, plan

PLANNER_DOC = Path(__file__).resolve().parents[1] / "docs" / "planner.md"
MODELS = ("llama-3.1-8b", "llama-3.1-70b", "llama-4-scout-17b-16e")
GPUS = ("h100", "h200")
GB = 10**9


def _plan(model: str, gpu: str, **kwargs: Any) -> dict[str, Any]:
    inputs = PlanInputs(model=model, device_memory_bytes=GPU_PRESETS_MIB[gpu] * MIB, tp=8, **kwargs)
    return plan(inputs).to_dict()


def _auto(d: dict[str, Any]) -> str:
    a = d["auto"]
    return f"{a['mode']} @ {a['effective_context']:,}{' (clamped)' if a['clamped'] else ''}"


def ordinary() -> list[str]:
    """Each model at its own default context, bf16 KV, upstream's defaults otherwise."""
    rows = [
        "| model | GPU | context | budget GiB | pool tokens | slots "
        "| static ctx-scaled GiB (share) | auto |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model in MODELS:
        for gpu in GPUS:
            d = _plan(model, gpu)
            st = d["static"]
            scaled = st["context_scaled_committed_bytes"]
            rows.append(
                f"| {model} | 8x {gpu.upper()} | {d['planned_context']:,} "
                f"| {d['budget_bytes'] / GIB:.1f} | {d['max_total_num_tokens']:,} "
                f"| {st['max_num_reqs']} | {scaled / GIB:.2f} "
                f"({100 * scaled / d['budget_bytes']:.1f}%) | {_auto(d)} |"
            )
    return rows


def long_contexts() -> list[str]:
    """1M and 10M tokens, bf16 and FP8 KV, fa3, `--allow-longer-context`."""
    rows = [
        "| model | GPU | context | KV dtype | KV B/token/GPU (full / chunked) | budget GiB "
        "| pool tokens | one request | static ctx-scaled committed GiB | fits slack "
        "| segmented committed / reserved GiB | segmented fits slack | auto |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model in MODELS:
        for gpu in GPUS:
            for context in (1_000_000, 10_000_000):
                for dtype in ("bf16", "fp8_e4m3"):
                    d = _plan(
                        model, gpu, context_length=context, kv_cache_dtype=dtype,
                        allow_longer_context=True,
                    )  # fmt: skip
                    c, st, sg = d["kv_per_token"], d["static"], d["segmented"]
                    rows.append(
                        f"| {model} | 8x {gpu.upper()} | {context:,} | {dtype} "
                        f"| {c['full_attention']:,} / {c['sliding_window']:,} "
                        f"| {d['budget_bytes'] / GIB:.1f} | {d['max_total_num_tokens']:,} "
                        f"| {d['max_context_one_request']:,} "
                        f"| {st['context_scaled_committed_bytes'] / GIB:.1f} "
                        f"| {'yes' if st['fits_in_slack'] else 'no'} "
                        f"| {sg['context_scaled_committed_bytes'] / GIB:.1f} / "
                        f"{sg['context_scaled_reserved_bytes'] / GIB:.1f} "
                        f"| {'yes' if sg['fits_in_slack'] else 'no'} | {_auto(d)} |"
                    )
    return rows


POOL_KIND_CASES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("llama-4-scout-17b-16e", {}),
    # Its FP8 weights, 84 GiB per GPU at TP 8, and a context past its model maximum.
    ("deepseek-v3", {"allow_longer_context": True, "weight_bytes_per_gpu": 84 * GIB}),
)


def _pool_kind_row(model: str, gpu: str, backend: str, extra: dict[str, Any]) -> str:
    head = f"| {model} | {gpu.upper()} | {backend} "
    try:
        d = _plan(
            model, gpu, context_length=10_485_760, kv_cache_dtype="fp8_e4m3",
            attention_backend=backend, **extra,
        )  # fmt: skip
    except PlanError as exc:
        return head + f"| | | | | | no | planner: {exc} |"
    kv = d["segmented_kv"]
    tables = d["segmented"]["context_scaled_committed_bytes"]
    headroom = kv["headroom_bytes"]
    if headroom < 0:
        fits, needs = "no", f"none: the device is short by {-headroom / GB:.1f} GB"
    else:
        flags = []
        if kv["swa_full_tokens_ratio_for_request"] is not None and not kv["request_fits_pool"]:
            flags.append(f"`--swa-full-tokens-ratio {kv['swa_full_tokens_ratio_for_request']}`")
        needed_fraction = kv["mem_fraction_static_for_request"]
        if needed_fraction is not None and needed_fraction > d["mem_fraction_static"]:
            flags.append(f"`--mem-fraction-static {needed_fraction}`")
        fits = "yes, with the flags" if flags else "yes"
        needs = ", ".join(flags) or "nothing: upstream's defaults"
    return head + (
        f"| {kv['reserved_bytes'] / GB:.1f} GB "
        f"| {kv['committed_at_start_bytes'] / GB:.2f} + {tables / GB:.1f} GB "
        f"| {kv['request_kv_bytes'] / GB:.1f} GB | {'yes' if kv['request_fits_pool'] else 'no'} "
        f"| {headroom / GB:.1f} GB | {fits} | {needs} |"
    )


def pool_kinds() -> list[str]:
    """Segmented KV per pool kind: one 10,485,760-token request, FP8 KV, TP 8."""
    rows = [
        "| model | 8x | backend | KV pool reserved / GPU "
        "| committed at start: KV + tables (worst case) "
        "| one 10,485,760-token request commits (KV) | pool holds it (upstream sizing) "
        "| headroom after weights, KV, tables | fits | what makes upstream's sizing hold it |",
        "| --- | --- | --- | ---: | ---: | ---: | --- | ---: | --- | --- |",
    ]
    for model, extra in POOL_KIND_CASES:
        for gpu in GPUS:
            for backend in ("fa3", "triton"):
                rows.append(_pool_kind_row(model, gpu, backend, extra))
    return rows


TABLES: dict[str, Callable[[], list[str]]] = {
    "ordinary": ordinary,
    "long-contexts": long_contexts,
    "pool-kinds": pool_kinds,
}


def _markers(name: str) -> tuple[str, str]:
    return (
        f"<!-- planner table {name}: generated by scripts/planner_tables.py; do not edit -->",
        f"<!-- planner table {name}: end -->",
    )


def render(name: str) -> str:
    begin, end = _markers(name)
    return "\n".join([begin, *TABLES[name](), end])


def current(name: str) -> str:
    text = PLANNER_DOC.read_text()
    begin, end = _markers(name)
    start, stop = text.find(begin), text.find(end)
    return "" if start < 0 or stop < 0 else text[start : stop + len(end)]


def write() -> None:
    text = PLANNER_DOC.read_text()
    for name in TABLES:
        old = current(name)
        if not old:
            raise SystemExit(f"{PLANNER_DOC}: markers of table {name} not found")
        text = text.replace(old, render(name))
    PLANNER_DOC.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite docs/planner.md")
    if parser.parse_args().write:
        write()
    else:
        sys.stdout.write("\n\n".join(render(name) for name in TABLES) + "\n")


if __name__ == "__main__":
    main()
