"""Unit tests for the capacity planner and its CLI (pure Python, no GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from sglang_kvalloc.core.planner import (
    AUTO_STATIC_MAX_SHARE,
    GIB,
    MIB,
    PlanError,
    PlanInputs,
    auto_mem_fraction_static,
    check_parallel,
    cuda_graph_allocations,
    decide_auto,
    derive_context_length,
    flashinfer_draft_kv_indices_layout,
    kv_budget_bytes,
    kv_per_token,
    load_model_config,
    model_spec_from_config,
    plan,
    pool_from_budget,
    req_to_token_allocation,
    resolve_max_num_reqs,
    triton_draft_kv_indices_layout,
)


def tiny_llama(**overrides: Any) -> dict[str, Any]:
    """2 layers, 2 KV heads, head_dim 16, float32: 2*2*16*4*2 = 512 B per token (K and V)."""
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 256,
        "max_position_embeddings": 4096,
        "torch_dtype": "float32",
    }
    cfg.update(overrides)
    return cfg


def tiny_llama4() -> dict[str, Any]:
    """4 layers: chunked local attention on layers 0-2, full attention on layer 3."""
    return {
        "architectures": ["Llama4ForConditionalGeneration"],
        "text_config": {
            "hidden_size": 64,
            "intermediate_size": 64,
            "intermediate_size_mlp": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "vocab_size": 256,
            "max_position_embeddings": 1 << 20,
            "attention_chunk_size": 64,
            "num_local_experts": 2,
            "torch_dtype": "bfloat16",
        },
    }


def tiny_mla() -> dict[str, Any]:
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "kv_lora_rank": 512,
        "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 128,
        "v_head_dim": 128,
        "vocab_size": 256,
        "max_position_embeddings": 163840,
        "torch_dtype": "bfloat16",
    }


# ---------------------------------------------------------------- bytes per token


def test_mha_bytes_per_token_hand_computed() -> None:
    spec = model_spec_from_config(tiny_llama())
    cell = kv_per_token(spec, attn_tp=1, kv_bytes=4)
    assert cell.full_attention == 2 * 2 * 16 * 4 * 2 == 512
    assert cell.sliding_window == 0 and cell.mla == 0
    assert cell.pool_cell == 512


def test_kv_heads_shard_then_replicate_with_tp() -> None:
    spec = model_spec_from_config(tiny_llama(num_attention_heads=8))
    assert kv_per_token(spec, attn_tp=2, kv_bytes=4).full_attention == 256  # 1 head per GPU
    # tp > kv heads: upstream replicates, one head per GPU (get_num_kv_heads).
    assert check_parallel(spec, tp=8, pp=1, attn_dp=1) == 8
    assert kv_per_token(spec, attn_tp=8, kv_bytes=4).full_attention == 256


def test_parallel_errors_only_where_upstream_errors() -> None:
    spec = model_spec_from_config(tiny_llama(num_attention_heads=6, num_key_value_heads=2))
    with pytest.raises(PlanError, match="not a multiple"):
        check_parallel(spec, tp=3, pp=1, attn_dp=1)  # 2 KV heads cannot replicate over 3
    with pytest.raises(PlanError, match="num_attention_heads"):
        check_parallel(spec, tp=4, pp=1, attn_dp=1)
    with pytest.raises(PlanError, match="attention-dp"):
        check_parallel(spec, tp=6, pp=1, attn_dp=4)
    assert check_parallel(spec, tp=6, pp=1, attn_dp=3) == 2


def test_mla_bytes_per_token() -> None:
    spec = model_spec_from_config(tiny_mla())
    assert spec.attention == "mla"
    for tp in (1, 4):  # the latent is not split across TP
        cell = kv_per_token(spec, attn_tp=tp, kv_bytes=2)
        assert cell.mla == (512 + 64) * 3 * 2 == 3456
        assert cell.full_attention == 0


def test_llama4_swa_layers_and_pool() -> None:
    spec = model_spec_from_config(tiny_llama4())
    assert spec.swa_layer_ids == (0, 1, 2) and spec.full_layer_ids == (3,)
    assert spec.sliding_window == 64
    cell = kv_per_token(spec, attn_tp=1, kv_bytes=2, swa_full_tokens_ratio=0.8)
    per_layer = 2 * (16 + 16) * 2  # 128 B
    assert cell.full_attention == per_layer * 1
    assert cell.sliding_window == per_layer * 3
    assert cell.pool_cell == pytest.approx(128 + 0.8 * 384)
    # HybridSWAPoolConfigurator: full = page-floor(budget // cell), swa = page-floor(0.8 full).
    budget = 1_000_000
    pool = pool_from_budget(budget, cell, page_size=16, swa_full_tokens_ratio=0.8)
    full = int(budget // (128 + 0.8 * 384)) // 16 * 16
    assert pool.max_total_num_tokens == full
    assert pool.swa_tokens == int(full * 0.8) // 16 * 16
    assert pool.pool_bytes <= budget


def test_swa_pool_too_small_for_window() -> None:
    inputs = PlanInputs(
        model=tiny_llama4(),
        device_memory_bytes=2 * GIB,
        weight_bytes_per_gpu=0,
        mem_fraction_static=0.9,
        max_total_tokens=64,
        attention_backend="triton",
    )
    with pytest.raises(PlanError, match="SWA pool"):
        plan(inputs)


def test_llama4_rejects_flashinfer_like_upstream() -> None:
    inputs = PlanInputs(model=tiny_llama4(), device_memory_bytes=8 * GIB, weight_bytes_per_gpu=0)
    with pytest.raises(PlanError, match="Llama-4"):
        plan(PlanInputs(**{**inputs.__dict__, "attention_backend": "flashinfer"}))


# ---------------------------------------------------------------- context and requests


def test_context_length_rules() -> None:
    rope = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}
    assert (
        derive_context_length({"max_position_embeddings": 131072, "rope_scaling": rope}) == 131072
    )
    assert derive_context_length({"max_position_embeddings": 4096, "rope_scaling": {"factor": 4}})
    assert derive_context_length({}) == 2048


def test_req_to_token_matches_brief() -> None:
    # 10M context, pool of ~4M tokens: estimated = 204 -> clamped up to 2048 rows.
    assert resolve_max_num_reqs(4_000_000, 10_000_000) == 2048
    alloc = req_to_token_allocation(2048, 10_000_000, 4)
    assert alloc.bytes == 2049 * 10_000_004 * 4 == 81_960_032_784


def test_resolve_max_num_reqs_branches() -> None:
    assert resolve_max_num_reqs(10_000_000, 131072) == 4096  # clamp from above
    assert resolve_max_num_reqs(2_000, 4096) == 1000  # capacity // 2
    assert resolve_max_num_reqs(1_000_000, 131072, max_running_requests=64, attn_dp=4) == 16
    assert resolve_max_num_reqs(100, 131072, max_running_requests=500) == 50


def test_cuda_graph_buffers() -> None:
    spec = model_spec_from_config(tiny_llama())
    ctx = 1_000_000
    (tri,) = cuda_graph_allocations(
        spec, backend="triton", max_bs=512, context_len=ctx, page_size=1
    )
    assert tri.bytes == 512 * ctx * 8
    fi = cuda_graph_allocations(
        spec, backend="flashinfer", max_bs=512, context_len=ctx, page_size=1
    )
    assert sum(a.bytes for a in fi) == 512 * ctx * 4 + 512 * ctx
    fa3 = cuda_graph_allocations(spec, backend="fa3", max_bs=512, context_len=ctx, page_size=16)
    pages = ctx // 16
    assert fa3[0].bytes == 512 * pages * 4
    assert fa3[1].bytes == pages * 8
    assert (
        cuda_graph_allocations(
            spec, backend="torch_native", max_bs=512, context_len=ctx, page_size=1
        )
        == []
    )


# ---------------------------------------------------------------- memory fraction and budget


def test_auto_mem_fraction_static_h100() -> None:
    # reserved = 512 + 8192*1.5 + tp/8*1024 + 2*max_bs + 58 prefill graphs * 8 (MiB)
    assert auto_mem_fraction_static(gpu_mem_mib=81559, tp=8, pp=1) == 0.812
    assert auto_mem_fraction_static(gpu_mem_mib=81559, tp=1, pp=1) == 0.830
    # 24 GiB, tp 1: chunked 4096, max_bs 48, 50 prefill graphs; no 10 GiB floor below 60 GiB.
    # reserved = 512 + 6144 + 128 + 96 + 400 = 7280 MiB -> (24576 - 7280) / 24576 = 0.704
    assert auto_mem_fraction_static(gpu_mem_mib=24 * 1024, tp=1, pp=1) == 0.704


def test_kv_budget_and_weights_error() -> None:
    assert kv_budget_bytes(
        pre_load_bytes=100 * GIB, weight_bytes=10 * GIB, mem_fraction_static=0.9
    ) == pytest.approx(80 * GIB, abs=1)
    with pytest.raises(PlanError, match="leave no memory"):
        kv_budget_bytes(pre_load_bytes=10 * GIB, weight_bytes=10 * GIB, mem_fraction_static=0.9)


def test_budget_too_small_for_one_page() -> None:
    inputs = PlanInputs(
        model=tiny_llama(),
        device_memory_bytes=2 * GIB,
        pre_load_overhead_bytes=0,
        weight_bytes_per_gpu=0,
        mem_fraction_static=0.5,
        page_size=1 << 30,
    )
    with pytest.raises(PlanError, match="one page of 1073741824 tokens needs"):
        plan(inputs)


# ---------------------------------------------------------------- decide_auto


def test_decide_auto_picks_static_when_cheap() -> None:
    d = decide_auto(
        requested_context=None,
        model_max_context=131072,
        max_context_one_request=4_000_000,
        context_scaled_bytes_static=int(AUTO_STATIC_MAX_SHARE * 1000),
        budget_bytes=1000,
    )
    assert (d.mode, d.effective_context, d.clamped) == ("static", 131072, False)


def test_decide_auto_picks_segmented_when_costly() -> None:
    d = decide_auto(
        requested_context=1_000_000,
        model_max_context=10_485_760,
        max_context_one_request=4_000_000,
        context_scaled_bytes_static=10 * GIB,
        budget_bytes=60 * GIB,
    )
    assert (d.mode, d.effective_context, d.clamped) == ("segmented", 1_000_000, False)


def test_decide_auto_clamps_and_names_both_numbers() -> None:
    d = decide_auto(
        requested_context=10_000_000,
        model_max_context=10_485_760,
        max_context_one_request=1_290_577,
        context_scaled_bytes_static=100 * GIB,
        budget_bytes=25 * GIB,
    )
    assert d.clamped and d.effective_context == 1_290_577
    assert "10000000" in d.reason and "1290577" in d.reason
    assert d.mode == "segmented"


def test_decide_auto_rejects_nonsense() -> None:
    with pytest.raises(PlanError):
        decide_auto(
            requested_context=0,
            model_max_context=1,
            max_context_one_request=1,
            context_scaled_bytes_static=0,
            budget_bytes=1,
        )


# ---------------------------------------------------------------- whole plans


def test_plan_llama31_8b_brief_numbers() -> None:
    result = plan(
        PlanInputs(
            model="llama-3.1-8b",
            device_memory_bytes=80 * GIB,
            tp=8,
            kv_cache_dtype="fp8_e4m3",
            context_length=10_000_000,
            allow_longer_context=True,
        )
    )
    assert result.kv_per_token.full_attention == 1 * 256 * 32 * 1
    req = result.static.allocations[0]
    assert req.name == "req_to_token" and req.bytes == 81_960_032_784
    # Segmented: one 2 MiB req_to_token granule per request slot; fa3's page table is lazy
    # (capture commits one granule per captured row: 512 rows of 40 MB), strided_indices not.
    tables, strided = result.segmented.allocations[1:]
    assert tables.lazy is not None and strided.lazy is None
    captured = result.segmented.cuda_graph_max_bs
    assert captured == 512
    (figures,) = result.segmented.lazy_graph_buffers
    assert figures["capture_commit_bytes"] == captured * 2 * MIB
    # One 10M-token request: ceil((10M + 1) / 1) + 1 pages x 4 B in one row = 20 granules.
    assert figures["one_full_context_request_commit_bytes"] == 20 * 2 * MIB
    assert result.segmented.context_scaled_committed_bytes == (
        (result.segmented.max_num_reqs + 1) * 2 * MIB + captured * 2 * MIB + strided.bytes
    )
    assert result.segmented.context_scaled_reserved_bytes == (
        result.static.context_scaled_reserved_bytes
    )
    assert not result.static.fits_in_slack
    assert result.auto.mode == "segmented" and result.auto.clamped
    # The pool once req_to_token's run-time room is kept free (past auto's 5% share), which
    # the clamp follows, as the server's does (test_row_room.py).
    room = result.segmented_kv.row_room
    assert room is not None and room.in_kv_budget > 0
    assert result.auto.effective_context == result.segmented_kv.max_total_num_tokens
    assert result.segmented_kv.max_total_num_tokens < result.max_context_one_request
    assert result.max_context_one_request <= result.max_total_num_tokens


def test_plan_bounds_by_model_max_without_override() -> None:
    result = plan(
        PlanInputs(model="llama-3.1-8b", device_memory_bytes=80 * GIB, context_length=1_000_000)
    )
    assert result.max_context_one_request <= 131072
    assert result.upstream_refusal is not None
    assert result.auto.effective_context == result.max_context_one_request


def test_plan_ordinary_context_stays_static() -> None:
    result = plan(PlanInputs(model="llama-3.1-8b", device_memory_bytes=81559 * MIB, tp=8))
    assert result.planned_context == 131072
    assert result.auto.mode == "static" and not result.auto.clamped


def test_plan_llama4_scout_is_hybrid() -> None:
    result = plan(PlanInputs(model="llama-4-scout-17b-16e", device_memory_bytes=81559 * MIB, tp=8))
    cell = result.kv_per_token
    assert (cell.full_layers, cell.swa_layers) == (12, 36)
    assert result.swa_tokens > 0
    assert result.model_max_context == 10_485_760


def test_load_builtin_configs_have_source() -> None:
    for name in ("llama-3.1-8b", "llama-3.1-70b", "llama-4-scout-17b-16e"):
        cfg = load_model_config(name)
        assert "_source" in cfg
    with pytest.raises(PlanError, match="not found"):
        load_model_config("no-such-model")


# ---------------------------------------------------------------- CLI


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sglang_kvalloc.plan", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["--model-config", "llama-3.1-8b", "--gpu-mem-gb", "-80"],
        ["--model-config", "llama-3.1-8b", "--gpu", "h100", "--kv-cache-dtype", "fp3"],
        ["--model-config", "llama-3.1-8b", "--gpu", "h100", "--context-length", "0"],
        ["--model-config", "llama-3.1-8b", "--gpu", "h100", "--context-length", "-5"],
        ["--model-config", "llama-3.1-8b", "--gpu", "h100", "--tp", "3"],
        ["--model-config", "llama-3.1-8b", "--gpu", "h100", "--tp", "0"],
        ["--model-config", "no-such-model", "--gpu", "h100"],
        ["--model-config", "llama-3.1-70b", "--gpu-mem-gb", "8"],
        ["--model-config", "llama-3.1-8b", "--gpu", "h100", "--page-size", "100000000"],
        ["--model-config", "llama-4-scout-17b-16e", "--gpu", "h100", "--tp", "8",
         "--attention-backend", "flashinfer"],
    ],
)  # fmt: skip
def test_cli_bad_input_exits_2_without_traceback(args: list[str]) -> None:
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "error:" in proc.stderr


def test_cli_json_parses() -> None:
    proc = run_cli(
        "--model-config", "llama-3.1-8b", "--gpu-mem-gb", "80", "--tp", "8",
        "--context-length", "10000000", "--kv-cache-dtype", "fp8_e4m3",
        "--allow-longer-context", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["static"]["allocations"][0]["bytes"] == 81_960_032_784
    assert data["auto"]["mode"] == "segmented"
    committed = data["segmented"]["context_scaled_committed_bytes"]
    assert 0 < committed < data["static"]["context_scaled_committed_bytes"] // 3


def test_scout_is_planned_text_only_unless_enable_multimodal() -> None:
    """Upstream serves Llama-4 text-only by default: no vision reduction of
    --mem-fraction-static and no embedding cache out of the KV budget; --enable-multimodal
    brings both back (the fractions themselves are checked against upstream's function in
    test_planner_upstream.py)."""
    common = ["--model-config", "llama-4-scout-17b-16e", "--gpu", "h100", "--tp", "8", "--json"]
    text_only = json.loads(run_cli(*common).stdout)
    vision = json.loads(run_cli(*common, "--enable-multimodal").stdout)
    assert vision["mem_fraction_static"] < text_only["mem_fraction_static"]
    assert text_only["budget_bytes"] - vision["budget_bytes"] > 10 * 2**30
    assert vision["max_total_num_tokens"] < text_only["max_total_num_tokens"]


def test_cli_table_mentions_both_modes() -> None:
    proc = run_cli("--model-config", "llama-3.1-70b", "--gpu", "h200", "--tp", "8")
    assert proc.returncode == 0, proc.stderr
    assert "static" in proc.stdout and "segmented" in proc.stdout
    assert "not measured" in proc.stdout


# ---------------------------------------------------------------- segmented KV per pool kind


def test_segmented_kv_one_request_of_scout_10m() -> None:
    """A 10,485,760-token request on Scout (FP8 KV, TP 8): every token in the 12 full layers,
    only window + chunk + page in the 36 chunked-local ones."""
    common = dict(
        model="llama-4-scout-17b-16e",
        tp=8,
        kv_cache_dtype="fp8_e4m3",
        context_length=10_485_760,
        attention_backend="triton",
    )
    h100 = plan(PlanInputs(device_memory_bytes=80 * GIB, **common))
    kv = h100.segmented_kv
    assert kv.pool_kind == "hybrid_swa"
    full_per_token = 12 * 1 * 128 * 2  # layers x KV heads per GPU x head_dim x (K, V) x 1 B
    swa_per_token = 36 * 1 * 128 * 2
    window = 8192 + 8192 + 1  # attention_chunk_size + default chunked prefill (H100) + page
    assert kv.request_swa_tokens == window
    assert kv.request_kv_bytes == 10_485_760 * full_per_token + window * swa_per_token
    assert not kv.request_fits_pool  # upstream's 0.8 SWA ratio spends the budget on SWA slots
    assert kv.swa_full_tokens_ratio_for_request == pytest.approx(window / 10_485_760, abs=1e-3)
    # The start commits one segment per sub-pool, not the pool.
    assert 0 < kv.committed_at_start_bytes < kv.reserved_bytes // 100
    # fa3's local-attention tables (21.5 GB at upstream's size) are reserved and commit what a
    # replay writes: fa3 then costs only its page tables' capture commit (one granule per
    # captured row, 2 x 512 x 2 MiB), strided_indices (84 MB) and the local tables' capture
    # commit (9 granules and one for each vector) more than triton (one granule).
    fa3 = plan(PlanInputs(device_memory_bytes=80 * GIB, **{**common, "attention_backend": "fa3"}))
    static = {a.name: a for a in fa3.static.allocations}
    assert static["fa3 local_block_table"].bytes == 512 * 1280 * 8192 * 4
    lazy = {f["name"]: f for f in fa3.segmented.lazy_graph_buffers}
    assert lazy["fa3 local_block_table"]["capture_commit_bytes"] == 9 * 2 * MIB  # 513 x 32 KiB
    gap = kv.headroom_bytes - fa3.segmented_kv.headroom_bytes
    assert gap == 2 * 512 * 2 * MIB + 10_485_760 * 8 + (9 + 2) * 2 * MIB - 2 * MIB


def test_segmented_kv_mla_and_mha() -> None:
    mla = plan(
        PlanInputs(model=tiny_mla(), device_memory_bytes=8 * GIB, context_length=100_000)
    ).segmented_kv
    assert mla.pool_kind == "mla" and mla.request_swa_tokens == 0
    assert mla.request_kv_bytes == 100_000 * 3 * (512 + 64) * 2
    mha = plan(PlanInputs(model=tiny_llama(), device_memory_bytes=8 * GIB)).segmented_kv
    assert mha.pool_kind == "mha" and mha.request_fits_pool and mha.headroom_bytes > 0
    assert mha.request_kv_bytes == 4096 * 512


def test_draft_runner_buffers_are_priced_with_the_hooks_layouts() -> None:
    """With draft steps, the draft worker's multi-step backend: triton and flashinfer one
    shared (steps, max_bs x topk x context) index buffer, fa3 steps - 1 copies of the target's
    tables without the verify mask; lazy with the layouts the hooks reserve."""
    spec = model_spec_from_config(tiny_llama())
    common = dict(max_bs=16, context_len=100_000, page_size=1, speculative_draft_tokens=4,
                  speculative_topk=2, speculative_num_steps=3)  # fmt: skip
    triton = {a.name: a for a in cuda_graph_allocations(spec, backend="triton", **common)}
    layout = triton_draft_kv_indices_layout(3, 16, 2, 100_000)
    assert (
        triton[layout.name].lazy == layout and triton[layout.name].bytes == 3 * 16 * 2 * 100_000 * 8
    )
    flashinfer = {a.name: a for a in cuda_graph_allocations(spec, backend="flashinfer", **common)}
    layout = flashinfer_draft_kv_indices_layout(3, 16, 2, 100_000)
    assert flashinfer[layout.name].lazy == layout
    fa3 = {a.name: a for a in cuda_graph_allocations(spec, backend="fa3", **common)}
    for name, allocation in list(fa3.items()):
        if name.startswith("draft "):
            target = fa3[name.removeprefix("draft ")]
            assert allocation.bytes == 2 * target.bytes and allocation.lazy == target.lazy
    assert "draft speculative verify mask" not in fa3 and "speculative verify mask" in fa3
    no_steps = cuda_graph_allocations(
        spec, backend="triton", **{**common, "speculative_num_steps": 0}
    )
    assert not any("draft" in a.name for a in no_steps)
