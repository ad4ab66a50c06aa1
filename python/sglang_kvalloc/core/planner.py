"""Capacity planner: KV pool size, context-scaled start-up allocations, and the auto decision.

Pure Python (stdlib only): no torch, no sglang, no GPU. Every formula mirrors a function of
upstream SGLang 0.5.23; the docstrings name the file (under ``sglang/srt/``) and function.
Where upstream measures something at run time (free GPU memory, weight bytes), the planner
estimates it and says so in the docstring.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sglang_kvalloc.core.graph_buffers import CHUNK_ROWS, FLAT, ROWS, GraphBatch, GraphBufferLayout

GIB = 1 << 30
MIB = 1 << 20

# Static is chosen by `auto` when the context-scaled start-up allocations (req_to_token and
# the cuda-graph index buffers) are at most this share of the KV budget. Below it, static's
# fixed tables cost little (an ordinary 128K context on one GPU lands at ~2-4%) and static
# keeps upstream behaviour exactly; above it, the tables eat KV capacity that segmented mode
# would leave for tokens, and at multi-million contexts they no longer fit at all.
AUTO_STATIC_MAX_SHARE = 0.05

KV_CACHE_DTYPES: dict[str, int | None] = {
    # None = "use the model dtype" (upstream configure_kv_cache_dtype, "auto").
    "auto": None,
    "bf16": 2,
    "bfloat16": 2,
    "fp16": 2,
    "float16": 2,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
    "float32": 4,
    "fp32": 4,
}
MODEL_DTYPE_BYTES: dict[str, int] = {
    "bfloat16": 2,
    "float16": 2,
    "half": 2,
    "float32": 4,
    "float": 4,
}
ATTENTION_BACKENDS: tuple[str, ...] = ("triton", "flashinfer", "fa3", "torch_native")
# models/llama4.py and arg_groups/model_hook.py accept only these backends for Llama-4 on GPU.
LLAMA4_BACKENDS: frozenset[str] = frozenset({"fa3", "triton"})
# configs/model_config.py is_hybrid_swa_model: the allowlisted hybrid sliding-window models
# whose HF config lists each layer's kind in `layer_types` (Llama-4 is handled on its own).
LAYER_TYPES_SWA_ARCHS = frozenset(
    {
        "BeamForCausalLM",
        "GptOssForCausalLM",
        "Gemma4ForCausalLM",
        "LagunaForCausalLM",
        "MellumForCausalLM",
        "MuseGlimmerForCausalLM",
        "Step3p5ForCausalLM",
    }
)
LLAMA4_ARCHS: frozenset[str] = frozenset({"Llama4ForConditionalGeneration", "Llama4ForCausalLM"})
# configs/model_config.py is_multimodal_model: only the archs this planner ships configs for.
MULTIMODAL_ARCHS: frozenset[str] = frozenset({"Llama4ForConditionalGeneration"})
# utils/hf_transformers/common.py CONTEXT_LENGTH_KEYS (order matters).
CONTEXT_LENGTH_KEYS: tuple[str, ...] = (
    "max_sequence_length",
    "seq_length",
    "max_seq_len",
    "model_max_length",
    "max_position_embeddings",
)
# Upstream's swa_full_tokens_ratio fallback (arg_groups/fields/schedule.py).
DEFAULT_SWA_FULL_TOKENS_RATIO = 0.8
# Estimate of what is already resident before weights load (CUDA context, NCCL and
# custom-allreduce buffers). Upstream measures it (distributed/bootstrap.py
# measure_pre_model_load_memory); the planner cannot, so it is a documented guess.
DEFAULT_PRE_LOAD_OVERHEAD_BYTES = 1 * GIB
# nvidia-smi memory.total (MiB) as reported for these parts; upstream reads the same figure in
# utils/common.py get_nvgpu_memory_capacity.
GPU_PRESETS_MIB: dict[str, int] = {"h100": 81559, "h200": 143771}
# SGLANG_VLM_CACHE_SIZE_MB default (environ.py), reserved by mm_runtime_reservation_gb.
VLM_CACHE_SIZE_MB = 100


class PlanError(ValueError):
    """Input the planner (or upstream) refuses; the message names the numbers."""


# --------------------------------------------------------------------------------------------
# Model description
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """What the planner needs from a HF config.json."""

    name: str
    architecture: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    vocab_size: int
    model_max_context: int
    dtype_bytes: int
    attention: str  # "mha" or "mla"
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    swa_layer_ids: tuple[int, ...] = ()
    sliding_window: int | None = None
    is_multimodal: bool = False
    vision_layers: int = 0
    vision_hidden: int = 0
    attention_params: int = 0  # all layers
    mlp_params: int = 0  # all layers (dense MLP or experts + router)
    embed_params: int = 0  # input embedding + LM head
    vision_params: int = 0

    @property
    def full_layer_ids(self) -> tuple[int, ...]:
        swa = set(self.swa_layer_ids)
        return tuple(i for i in range(self.num_layers) if i not in swa)

    @property
    def is_hybrid_swa(self) -> bool:
        return bool(self.swa_layer_ids)


def builtin_config_dir() -> Path:
    """Directory of the shipped model configs."""
    return Path(__file__).resolve().parent.parent / "configs"


def builtin_model_names() -> list[str]:
    """Names accepted by `load_model_config` without a path."""
    return sorted(p.stem for p in builtin_config_dir().glob("*.json"))


def load_model_config(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """Load a HF-style config from a dict, a built-in name, a json file or a model directory."""
    if isinstance(source, Mapping):
        return dict(source)
    text = str(source)
    builtin = builtin_config_dir() / f"{text}.json"
    path = Path(text)
    if builtin.is_file() and not path.exists():
        path = builtin
    elif path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        names = ", ".join(builtin_model_names())
        raise PlanError(f"model config {text!r} not found (built-in names: {names})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PlanError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise PlanError(f"{path} does not hold a JSON object")
    data.setdefault("_name", path.stem if path.name != "config.json" else path.parent.name)
    return data


def derive_context_length(text_config: Mapping[str, Any]) -> int:
    """Model context length; mirrors utils/hf_transformers/common.py get_context_length."""
    rope = text_config.get("rope_scaling") or None
    factor = 1.0
    if rope:
        factor = rope.get("factor", 1)
        # Both cases mean max_position_embeddings already includes the scaling.
        if "original_max_position_embeddings" in rope or rope.get("rope_type") == "llama3":
            factor = 1
    for key in CONTEXT_LENGTH_KEYS:
        value = text_config.get(key)
        if value is not None:
            return int(factor * value)
    return 2048


def _dense_layer_params(h: int, inter: int) -> int:
    return 3 * h * inter


def model_spec_from_config(cfg: Mapping[str, Any], name: str | None = None) -> ModelSpec:
    """Read the KV-relevant shape of a model; mirrors configs/model_config.py ModelConfig."""
    arch = (cfg.get("architectures") or ["unknown"])[0]
    text = cfg.get("text_config") or cfg
    try:
        layers = int(text["num_hidden_layers"])
        hidden = int(text["hidden_size"])
        heads = int(text["num_attention_heads"])
    except KeyError as exc:
        raise PlanError(f"model config lacks {exc.args[0]!r}") from exc
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or hidden // heads)
    vocab = int(text.get("vocab_size") or cfg.get("vocab_size") or 0)
    dtype_name = str(text.get("torch_dtype") or cfg.get("torch_dtype") or "bfloat16")
    dtype_bytes = MODEL_DTYPE_BYTES.get(dtype_name.replace("torch.", ""), 2)

    attention = "mla" if text.get("kv_lora_rank") else "mha"
    kv_lora = int(text.get("kv_lora_rank") or 0)
    rope_dim = int(text.get("qk_rope_head_dim") or 0)
    v_head_dim = int(text.get("v_head_dim") or head_dim) if attention == "mla" else head_dim

    # configs/model_config.py get_hybrid_layer_ids: Llama-4 runs chunked local attention on
    # every layer but each 4th; other hybrid models opt in with is_hybrid_swa + layer_types.
    swa_ids: tuple[int, ...] = ()
    window: int | None = None
    if arch in LLAMA4_ARCHS:
        swa_ids = tuple(i for i in range(layers) if (i + 1) % 4 != 0)
        window = text.get("attention_chunk_size")
    elif (arch in LAYER_TYPES_SWA_ARCHS or text.get("is_hybrid_swa")) and text.get("layer_types"):
        swa_ids = tuple(
            i for i, kind in enumerate(text["layer_types"]) if kind == "sliding_attention"
        )
        window = text.get("sliding_window")
    vision = cfg.get("vision_config") or {}

    # Parameter count, used only to estimate weight bytes per GPU.
    if attention == "mla":
        q_lora = int(text.get("q_lora_rank") or 0)
        nope = int(text.get("qk_nope_head_dim") or 0)
        qk = nope + rope_dim
        q = hidden * q_lora + q_lora * heads * qk if q_lora else hidden * heads * qk
        attn = q + hidden * (kv_lora + rope_dim) + kv_lora * heads * (nope + v_head_dim)
        attn += heads * v_head_dim * hidden
    else:
        attn = hidden * head_dim * (2 * heads + 2 * kv_heads)
    experts = int(text.get("num_local_experts") or text.get("n_routed_experts") or 0)
    moe_inter = int(text.get("moe_intermediate_size") or text.get("intermediate_size") or 0)
    dense_inter = int(text.get("intermediate_size_mlp") or text.get("intermediate_size") or 0)
    shared = int(text.get("n_shared_experts") or (1 if arch in LLAMA4_ARCHS else 0))
    first_dense = int(text.get("first_k_dense_replace") or 0)
    step = int(text.get("interleave_moe_layer_step") or 1)
    mlp = 0
    for i in range(layers):
        is_moe = experts > 0 and i >= first_dense and (i + 1) % step == 0
        if is_moe:
            mlp += (experts + shared) * _dense_layer_params(hidden, moe_inter)
            mlp += hidden * experts
        else:
            mlp += _dense_layer_params(hidden, dense_inter)
    tied = bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    embed = vocab * hidden * (1 if tied else 2)
    vh = int(vision.get("hidden_size") or 0)
    vision_params = int(vision.get("num_hidden_layers") or 0) * (
        4 * vh * vh + 2 * vh * int(vision.get("intermediate_size") or 0)
    )
    return ModelSpec(
        name=name or str(cfg.get("_name") or arch),
        architecture=arch,
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        v_head_dim=v_head_dim,
        vocab_size=vocab,
        model_max_context=derive_context_length(text),
        dtype_bytes=dtype_bytes,
        attention=attention,
        kv_lora_rank=kv_lora,
        qk_rope_head_dim=rope_dim,
        swa_layer_ids=swa_ids,
        sliding_window=int(window) if window else None,
        is_multimodal=arch in MULTIMODAL_ARCHS and bool(vision),
        vision_layers=int(vision.get("num_hidden_layers") or 0),
        vision_hidden=vh,
        attention_params=layers * attn,
        mlp_params=mlp,
        embed_params=embed,
        vision_params=vision_params,
    )


# --------------------------------------------------------------------------------------------
# Parallel layout and per-token KV bytes
# --------------------------------------------------------------------------------------------


def pp_layer_range(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """Layers of one PP stage; mirrors distributed/utils.py get_pp_indices (no env partition)."""
    base, rem = divmod(num_layers, pp_size)
    if pp_rank >= pp_size - rem:
        start = pp_rank * (base + 1) - (pp_size - rem)
        return start, start + base + 1
    return pp_rank * base, pp_rank * base + base


def check_parallel(spec: ModelSpec, tp: int, pp: int, attn_dp: int) -> int:
    """Validate the layout the way upstream does and return attn_tp_size.

    Mirrors the asserts in models/llama.py / models/llama4.py LlamaAttention.__init__ and
    layers/linear.py QKVParallelLinear: heads must divide by attn_tp; KV heads either divide
    by attn_tp or, when fewer, attn_tp must be a multiple of them (then they replicate).
    """
    if tp < 1 or pp < 1 or attn_dp < 1:
        raise PlanError(f"tp, pp and attention-dp must be >= 1 (got {tp}, {pp}, {attn_dp})")
    if tp % attn_dp:
        raise PlanError(f"tp ({tp}) must be divisible by attention-dp size ({attn_dp})")
    if pp > spec.num_layers:
        raise PlanError(f"pp ({pp}) exceeds the model's {spec.num_layers} layers")
    attn_tp = tp // attn_dp
    if spec.num_attention_heads % attn_tp:
        raise PlanError(
            f"num_attention_heads ({spec.num_attention_heads}) is not divisible by the "
            f"attention tp size ({attn_tp})"
        )
    if spec.attention == "mha":
        kv = spec.num_kv_heads
        if kv >= attn_tp and kv % attn_tp:
            raise PlanError(f"num_key_value_heads ({kv}) is not divisible by attn tp ({attn_tp})")
        if kv < attn_tp and attn_tp % kv:
            raise PlanError(
                f"attn tp ({attn_tp}) is not a multiple of num_key_value_heads ({kv}), "
                "so KV heads cannot be replicated evenly"
            )
    return attn_tp


def kv_heads_per_gpu(spec: ModelSpec, attn_tp: int) -> int:
    """Mirrors configs/model_config.py ModelConfig.get_num_kv_heads (dcp_size = 1)."""
    return max(1, spec.num_kv_heads // attn_tp)


def kv_dtype_bytes(kv_cache_dtype: str, model_dtype_bytes: int) -> int:
    """Bytes per KV element; mirrors mem_cache/kv_cache_dtype.py configure_kv_cache_dtype.

    "auto" takes the model dtype (upstream also picks fp8 when the checkpoint's quant config
    says kv_cache_quant_algo=FP8; the planner does not read quant configs). fp16 and float32
    are reachable upstream only through "auto" with --dtype; they are accepted here directly.
    """
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise PlanError(
            f"unknown kv cache dtype {kv_cache_dtype!r} (choose from {', '.join(KV_CACHE_DTYPES)})"
        )
    size = KV_CACHE_DTYPES[kv_cache_dtype]
    return model_dtype_bytes if size is None else size


@dataclass(frozen=True)
class KVPerToken:
    """KV bytes per token per GPU, by layer kind, for one PP stage."""

    full_attention: int  # all full-attention (MHA) layers on the stage
    sliding_window: int  # all SWA / chunked-local layers on the stage (per SWA-pool token)
    mla: int  # all MLA layers on the stage
    full_layers: int
    swa_layers: int
    per_layer_full: int
    per_layer_swa: int
    # Bytes per max_total_num_tokens slot (what the budget is divided by).
    pool_cell: float


def kv_per_token(
    spec: ModelSpec,
    *,
    attn_tp: int,
    kv_bytes: int,
    layer_range: tuple[int, int] | None = None,
    swa_full_tokens_ratio: float = DEFAULT_SWA_FULL_TOKENS_RATIO,
) -> KVPerToken:
    """Per-token KV bytes on one GPU.

    MHA mirrors model_executor/pool_configurator.py DefaultPoolConfigurator._compute_cell_size
    (heads x (head_dim + v_head_dim) x layers x itemsize, i.e. MHATokenToKVPool's K and V);
    MLA mirrors the same function via mem_cache/kv_cache_configurator.py
    calculate_mla_kv_cache_dim ((kv_lora_rank + qk_rope_head_dim) x layers x itemsize, no TP
    split, as MLATokenToKVPool); hybrid SWA mirrors HybridSWAPoolConfigurator.__init__ and
    _recompute_cell_size (full + swa_full_tokens_ratio x swa bytes per full-pool token).
    """
    start, end = layer_range or (0, spec.num_layers)
    swa_set = set(spec.swa_layer_ids)
    swa_layers = sum(1 for i in range(start, end) if i in swa_set)
    full_layers = (end - start) - swa_layers
    if spec.attention == "mla":
        per_layer = (spec.kv_lora_rank + spec.qk_rope_head_dim) * kv_bytes
        mla = per_layer * full_layers
        swa = per_layer * swa_layers
        return KVPerToken(
            full_attention=0,
            sliding_window=swa,
            mla=mla,
            full_layers=full_layers,
            swa_layers=swa_layers,
            per_layer_full=per_layer,
            per_layer_swa=per_layer,
            pool_cell=_pool_cell(mla, swa, full_layers, swa_layers, swa_full_tokens_ratio),
        )
    per_layer = kv_heads_per_gpu(spec, attn_tp) * (spec.head_dim + spec.v_head_dim) * kv_bytes
    full = per_layer * full_layers
    swa = per_layer * swa_layers
    return KVPerToken(
        full_attention=full,
        sliding_window=swa,
        mla=0,
        full_layers=full_layers,
        swa_layers=swa_layers,
        per_layer_full=per_layer,
        per_layer_swa=per_layer,
        pool_cell=_pool_cell(full, swa, full_layers, swa_layers, swa_full_tokens_ratio),
    )


def _pool_cell(full: int, swa: int, n_full: int, n_swa: int, ratio: float) -> float:
    if n_swa == 0:
        return float(full)
    if n_full == 0:
        # All-SWA stage: no full pool to relate to, the ratio is not applied.
        return float(swa)
    return full + ratio * swa


# --------------------------------------------------------------------------------------------
# Upstream defaults that depend on the device
# --------------------------------------------------------------------------------------------


def default_chunked_prefill_size(gpu_mem_mib: float | None) -> int:
    """Mirrors arg_groups/memory_hook.py handle_gpu_memory_settings (chunked_prefill_size)."""
    if gpu_mem_mib is None:
        return 4096
    if gpu_mem_mib < 20 * 1024:
        return 2048
    if gpu_mem_mib < 60 * 1024:
        return 4096
    if gpu_mem_mib < 160 * 1024:
        return 8192
    return 16384


def default_cuda_graph_max_bs(
    gpu_mem_mib: float | None, tp: int, max_running_requests: int | None = None
) -> int:
    """Decode cuda-graph max_bs; mirrors memory_hook.py handle_gpu_memory_settings.

    The default is capped by --max-running-requests when that is smaller.
    """
    if gpu_mem_mib is None:
        bs = 160
    elif gpu_mem_mib < 20 * 1024:
        bs = 8
    elif gpu_mem_mib < 35 * 1024:
        bs = 48 if tp < 4 else 160
    elif gpu_mem_mib < 60 * 1024:
        bs = 32 if tp < 4 else 160
    elif gpu_mem_mib < 160 * 1024:
        bs = 256 if tp < 4 else 512
    else:
        bs = 512
    if max_running_requests is not None and bs > max_running_requests:
        bs = max_running_requests
    return bs


def prefill_cuda_graph_sizes(max_bs: int) -> list[int]:
    """Mirrors arg_groups/cuda_graph_hook.py generate_prefill_cuda_graph_batch_sizes."""
    sizes = (
        list(range(4, 33, 4))
        + list(range(48, 257, 16))
        + list(range(288, 513, 32))
        + list(range(576, 1025, 64))
        + list(range(1280, 4097, 256))
        + list(range(4608, max_bs + 1, 512))
    )
    return [s for s in sizes if s <= max_bs]


def auto_mem_fraction_static(
    *,
    gpu_mem_mib: float,
    tp: int,
    pp: int,
    attn_dp: int = 1,
    cuda_graph_max_bs: int | None = None,
    chunked_prefill_size: int | None = None,
    use_mla: bool = False,
    cuda_graph: bool = True,
    vision_layers: int = 0,
    vision_hidden: int = 0,
) -> float:
    """Upstream's mem_fraction_static when it is unset.

    Mirrors arg_groups/memory_hook.py handle_gpu_memory_settings ("Static memory and runtime
    headroom") with reserve_for_graph_mb and adjust_mem_fraction_for_vlm, for a CUDA device,
    no disaggregation, no DeepEP and post-capture KV sizing off (its default):
    reserved_mb = 512 + 1.5 x max(chunked_prefill, 2048) + tp x pp / 8 x 1024 + graph reserve,
    at least 10 GiB above 60 GiB devices; fraction = round((mem - reserved) / mem, 3).
    """
    cps = chunked_prefill_size or default_chunked_prefill_size(gpu_mem_mib)
    max_bs = cuda_graph_max_bs or default_cuda_graph_max_bs(gpu_mem_mib, tp)
    reserved = 512 + max(cps, 2048) * 1.5 + tp * pp / 8 * 1024
    if cuda_graph:
        reserved += max_bs * 2
        if attn_dp > 1:
            reserved += max_bs * attn_dp * 3
            if max_bs > 300:
                reserved += max_bs * attn_dp * 1.5
        # Prefill graphs default to the breakable backend on CUDA.
        if use_mla:
            reserved += 1.5 * 1024
        else:
            reserved += len(prefill_cuda_graph_sizes(cps)) * 8
    if gpu_mem_mib > 60 * 1024:
        reserved = max(reserved, 10 * 1024)
    fraction = round((gpu_mem_mib - reserved) / gpu_mem_mib, 3)
    if vision_layers:
        # adjust_mem_fraction_for_vlm: shrink by ViT size relative to ViT-L/14.
        ratio = vision_layers * vision_hidden**2 / (24 * 1024**2)
        factor = max(0.8, min(1.05, 1.0 - 0.1 * (ratio - 1.0)))
        fraction *= 0.95 * factor
    return fraction


def estimate_weight_bytes_per_gpu(
    spec: ModelSpec, *, tp: int, attn_tp: int, layer_range: tuple[int, int]
) -> int:
    """Weight bytes on one GPU of a stage: an estimate from the parameter count.

    Upstream measures this (free memory before minus after load). Attention weights split over
    attn_tp, MLP / experts, embeddings, LM head and vision tower over tp; embeddings, LM head
    and vision tower are charged to every PP stage (the worst stage decides). Quantized
    checkpoints are not modelled: pass weight bytes explicitly for those.
    """
    start, end = layer_range
    share = (end - start) / spec.num_layers
    params = spec.attention_params * share / attn_tp + spec.mlp_params * share / tp
    params += (spec.embed_params + spec.vision_params) / tp
    return int(params * spec.dtype_bytes)


# --------------------------------------------------------------------------------------------
# Budget, pool, requests
# --------------------------------------------------------------------------------------------


def kv_budget_bytes(
    *,
    pre_load_bytes: int,
    weight_bytes: int,
    mem_fraction_static: float,
    mm_reservation_bytes: int = 0,
) -> int:
    """KV byte budget; mirrors mem_cache/kv_cache_configurator.py _profile_available_bytes.

    budget = free_after_load - pre_load x (1 - mem_fraction_static) - mm_reservation, with
    free_after_load = pre_load - weights (upstream measures it; the planner subtracts).
    """
    free_after_load = pre_load_bytes - weight_bytes
    slack = pre_load_bytes * (1 - mem_fraction_static)
    rest = free_after_load - slack - mm_reservation_bytes
    if rest <= 0:
        minimum = 1 - free_after_load / pre_load_bytes
        raise PlanError(
            f"weights ({weight_bytes} B per GPU) leave no memory for the KV cache under "
            f"mem_fraction_static={mem_fraction_static}; raise it above "
            f"{math.ceil(minimum * 1000) / 1000:.3f} or use more GPUs"
        )
    return int(rest)


@dataclass(frozen=True)
class PoolSize:
    """Result of sizing the KV pool from a budget."""

    max_total_num_tokens: int  # full-attention (or MHA/MLA) tokens: what one request can use
    swa_tokens: int  # SWA pool tokens (0 when not hybrid)
    pool_bytes: int


def pool_from_budget(
    budget_bytes: int,
    cell: KVPerToken,
    *,
    page_size: int,
    swa_full_tokens_ratio: float = DEFAULT_SWA_FULL_TOKENS_RATIO,
    max_total_tokens: int | None = None,
) -> PoolSize:
    """Tokens a budget holds.

    Mirrors mem_cache/kv_cache_configurator.py config_from_budget with
    model_executor/pool_configurator.py DefaultPoolConfigurator.calculate_pool_sizes
    (budget // cell, page-floored) or HybridSWAPoolConfigurator.calculate_pool_sizes /
    _solve_pool_sizes (full = page-floor(budget // cell), swa = page-floor(full x ratio)),
    then _apply_token_constraints (the --max-total-tokens cap).
    """
    tokens = int(budget_bytes // cell.pool_cell) if cell.pool_cell else 0
    if max_total_tokens is not None:
        tokens = min(tokens, max_total_tokens)
    tokens = tokens // page_size * page_size
    if cell.swa_layers and cell.full_layers:
        swa = int(tokens * swa_full_tokens_ratio) // page_size * page_size
        used = tokens * (cell.full_attention + cell.mla) + swa * cell.sliding_window
    elif cell.swa_layers:
        swa = tokens
        used = tokens * cell.sliding_window
    else:
        swa = 0
        used = tokens * (cell.full_attention + cell.mla)
    return PoolSize(max_total_num_tokens=tokens, swa_tokens=swa, pool_bytes=int(used))


def resolve_max_num_reqs(
    token_capacity: int,
    context_len: int,
    *,
    max_running_requests: int | None = None,
    attn_dp: int = 1,
) -> int:
    """Request slots per DP worker; mirrors kv_cache_configurator.py resolve_max_num_reqs.

    Without --max-running-requests: clamp(capacity / context x 512, 2048, 4096), then at most
    capacity // 2. That floor of 2048 is why req_to_token is 2049 rows at long contexts.
    """
    estimated = int(token_capacity / context_len * 512)
    estimated = max(min(estimated, 4096), 2048)
    if max_running_requests is not None:
        return min(max(1, max_running_requests // attn_dp), token_capacity // 2)
    return min(estimated, token_capacity // 2)


# The CUDA VMM granularity segmented mode commits req_to_token rows in: the RECOMMENDED
# granularity of pinned device memory, 2 MiB on H100/H200 (expected; the GPU suite records it).
GPU_VMM_GRANULARITY = 2 * MIB


def segmented_committed_bytes(
    allocations: list[Allocation],
    max_reqs: int,
    *,
    on_gpu: bool,
    captured_bs: int = 0,
    tokens_per_row: int = 1,
) -> int:
    """What segmented mode commits at start-up of the context-sized allocations, counting each
    running request's first req_to_token granule (the worst case for requests shorter than one
    granule of positions, 524,288 on a GPU; on the CPU pages commit as they are written).

    Lazy cuda-graph buffers count what capturing the largest batch commits (rows of length
    one, upstream's fill value); the others count in full.
    """
    capture = capture_batch(captured_bs, tokens_per_row)
    committed = 0
    for allocation in allocations:
        if allocation.name == "req_to_token":
            if on_gpu:
                committed += min(allocation.bytes, (max_reqs + 1) * GPU_VMM_GRANULARITY)
        elif on_gpu:
            committed += allocation.segmented_commit_bytes(capture)
        else:
            committed += allocation.bytes
    return committed


def capture_batch(captured_bs: int, tokens_per_row: int = 1) -> GraphBatch:
    """The batch graph capture fills: every captured row at upstream's seq_len_fill_value (1)."""
    return GraphBatch(captured_bs, captured_bs, 1, max(1, tokens_per_row))


VERIFY_MASK = "speculative verify mask"


def triton_kv_indices_layout(max_num_tokens: int, context_len: int) -> GraphBufferLayout:
    """Mirrors TritonAttnBackend.init_cuda_graph_state: ``cuda_graph_kv_indices`` =
    zeros((max_num_tokens * max_context_len,), int64), ragged indices end to end."""
    return GraphBufferLayout(
        "triton cuda_graph_kv_indices", FLAT, 1, max_num_tokens * context_len, 8
    )


def triton_draft_kv_indices_layout(
    steps: int, max_bs: int, topk: int, context_len: int
) -> GraphBufferLayout:
    """Mirrors TritonMultiStepDraftBackend.init_cuda_graph_state: ``cuda_graph_kv_indices`` =
    zeros((speculative_num_steps, max_bs x topk x max_context_len), int64)
    (speculative/spec_utils.py draft_kv_indices_buffer_width); each step's row holds its
    ragged lists end to end (``seq_lens_sum x topk + branches x step`` items)."""
    return GraphBufferLayout(
        "triton draft cuda_graph_kv_indices", FLAT, steps, max_bs * topk * context_len, 8
    )


def flashinfer_draft_kv_indices_layout(
    steps: int, max_bs: int, topk: int, context_len: int
) -> GraphBufferLayout:
    """Mirrors FlashInferMultiStepDraftBackend.init_cuda_graph_state: the same shape as
    triton's draft buffer in int32, each step's row sliced to
    ``draft_kv_indices_used_len`` as triton's."""
    return GraphBufferLayout(
        "flashinfer draft cuda_graph_kv_indices", FLAT, steps, max_bs * topk * context_len, 4
    )


def draft_graph_batch(
    rows: int, seq_lens_sum: int, max_seq_len: int, topk: int, steps: int
) -> GraphBatch:
    """What a draft-decode replay of ``rows`` requests fills: ``topk`` branches per request,
    each growing by one position per step (covers spec_utils.draft_kv_indices_used_len)."""
    topk = max(1, topk)
    return GraphBatch(rows * topk, seq_lens_sum * topk, max_seq_len + steps, max(1, steps))


def flashinfer_kv_indices_layout(
    max_num_tokens: int, context_len: int, page_size: int
) -> GraphBufferLayout:
    """Mirrors FlashInferAttnBackend.init_cuda_graph_state: each wrapper's
    ``cuda_graph_kv_indices`` = zeros((max_num_tokens * max_context_len,), int32), filled with
    page ids end to end."""
    return GraphBufferLayout(
        "flashinfer cuda_graph_kv_indices",
        FLAT,
        1,
        max_num_tokens * context_len,
        4,
        page_size,
    )


def flashinfer_custom_mask_layout(max_num_tokens: int, context_len: int) -> GraphBufferLayout:
    """Mirrors FlashInferAttnBackend.init_cuda_graph_state: ``cuda_graph_custom_mask`` =
    zeros((max_num_tokens * max_context_len,), uint8), one byte per (query token, position)."""
    return GraphBufferLayout(
        "flashinfer cuda_graph_custom_mask",
        FLAT,
        1,
        max_num_tokens * context_len,
        1,
        per_query_token=True,
    )


def verify_mask_layout(max_bs: int, draft: int, context_len: int) -> GraphBufferLayout:
    """Mirrors layers/attention/verify_mask.py maybe_create_verify_mask (FULL_MASK, the GPU
    layout): ``tree_mask_numel`` = max_bs x draft x (max_context_len + draft) bytes; the draft
    stage writes ``draft x (seq_len + draft)`` per request, end to end."""
    return GraphBufferLayout(
        VERIFY_MASK, FLAT, 1, max_bs * draft * (context_len + draft), 1, per_query_token=True
    )


def fa3_page_table_layout(max_bs: int, context_len: int, page_size: int) -> GraphBufferLayout:
    """Mirrors FlashAttentionBackend.init_cuda_graph_state: each page table is
    zeros((max_bs, ceil(max_context_len / page_size)), int32), one row per batch row."""
    pages = -(-context_len // page_size)
    return GraphBufferLayout("fa3 page table", ROWS, max_bs, pages, 4, page_size)


def fa3_swa_spec_page_table_layout(max_bs: int, draft: int, context_len: int) -> GraphBufferLayout:
    """Mirrors FlashAttentionBackend.init_cuda_graph_state with top-k > 1 and a sliding window:
    ``target_verify_metadata_topk_swa["page_table"]`` = zeros((max_bs x draft, context +
    draft), int32), one row per draft token, which ``prepare_swa_spec_page_table_triton``
    fills up to its request's length plus its draft positions (page size 1 only)."""
    return GraphBufferLayout(
        "fa3 swa-spec page table", ROWS, max_bs * draft, context_len + draft, 4,
        per_query_token=True,
    )  # fmt: skip


def fa3_local_attention_layouts(
    max_bs: int, context_len: int, chunk: int, page_size: int
) -> list[GraphBufferLayout]:
    """Mirrors layers/attention/local_attention.py
    LocalAttentionMetadataBuilder.alloc_cuda_graph_buffers (Llama-4's chunked local attention
    under fa3): ``max_bs x ceil(context / chunk)`` virtual batches, each a row of
    ``local_block_table`` (``ceil(chunk / page)`` int32 page ids) and an entry of
    ``local_seqused_k`` and ``local_query_start_loc`` (one more). ``update_for_replay`` writes
    a row per (request, chunk its query tokens reach) and zeroes the rest."""
    virtual = max_bs * -(-context_len // chunk)
    per_block = -(-chunk // page_size)
    return [
        GraphBufferLayout(
            "fa3 local_block_table", CHUNK_ROWS, virtual, per_block, 4, page_size,
            chunk_positions=chunk,
        ),
        GraphBufferLayout("fa3 local_seqused_k", CHUNK_ROWS, virtual, 1, 4, chunk_positions=chunk),
        GraphBufferLayout(
            "fa3 local_query_start_loc", CHUNK_ROWS, virtual + 1, 1, 4, chunk_positions=chunk
        ),
    ]  # fmt: skip


def req_to_token_extra(speculative_draft_tokens: int = 0) -> int:
    """Row headroom past context_len; mirrors mem_cache/allocation_sizing.py
    get_req_to_token_extra_context_len (4 + draft tokens; spec v2 with page > 1 may add more).
    """
    return 4 + speculative_draft_tokens


@dataclass(frozen=True)
class Allocation:
    """One start-up allocation whose size grows with the context length."""

    name: str
    bytes: int
    formula: str
    upstream: str
    # Segmented mode on a GPU reserves this buffer and commits it per replay (issue 9): its
    # layout (one table of ``copies`` identical ones), else None (allocated at upstream's size).
    lazy: GraphBufferLayout | None = None
    copies: int = 1

    def segmented_commit_bytes(self, batch: GraphBatch) -> int:
        """What segmented mode on a GPU commits of this buffer for ``batch``: the lazy
        layout's arithmetic, or all of it where the buffer is not lazy."""
        if self.lazy is None:
            return self.bytes
        return self.copies * self.lazy.commit_bytes(batch, GPU_VMM_GRANULARITY)


def req_to_token_allocation(max_reqs: int, context_len: int, extra: int) -> Allocation:
    """Mirrors mem_cache/memory_pool.py ReqToTokenPool.__init__:
    torch.zeros((size + 1, max_context_len), int32), max_context_len = context_len + extra
    (kv_cache_configurator.py _build_req_to_token_pool / _build_default_req_pool).
    """
    rows = max_reqs + 1
    cols = context_len + extra
    return Allocation(
        name="req_to_token",
        bytes=rows * cols * 4,
        formula=f"({max_reqs} + 1) x ({context_len} + {extra}) x 4 B",
        upstream="mem_cache/memory_pool.py ReqToTokenPool.__init__",
    )


def cuda_graph_allocations(
    spec: ModelSpec,
    *,
    backend: str,
    max_bs: int,
    context_len: int,
    page_size: int,
    speculative_draft_tokens: int = 0,
    speculative_topk: int = 1,
    speculative_num_steps: int = 0,
) -> list[Allocation]:
    """Context-sized cuda-graph buffers of the decode runner's attention backend, and with
    speculative decoding (``speculative_num_steps`` > 1) those of the draft worker's
    multi-step backend (the same backend kind; its captured batch is the target's).

    max_bs is the captured batch (min of the cuda-graph max_bs and the request slots, as
    model_executor/runner/base_cuda_graph_runner.py get_batch_sizes_to_capture clamps it);
    tokens per batch row = draft tokens under speculative decoding (decode_cuda_graph_runner
    max_num_token). Each entry names the backend method it mirrors.
    """
    if max_bs <= 0 or backend == "torch_native":
        return []
    draft = speculative_draft_tokens
    tokens = max_bs * max(1, draft)
    out: list[Allocation] = []
    if backend == "triton":
        layout = triton_kv_indices_layout(tokens, context_len)
        out.append(
            Allocation(
                layout.name,
                layout.reserved_bytes,
                f"{tokens} x {context_len} x 8 B (int64)",
                "layers/attention/triton_backend.py TritonAttnBackend.init_cuda_graph_state",
                lazy=layout,
            )
        )
        if draft:
            out.append(_verify_mask(max_bs, draft, context_len, "triton_backend.py"))
    elif backend == "flashinfer" and spec.attention == "mla":
        out.append(
            Allocation(
                "flashinfer_mla cuda_graph_kv_indices",
                max_bs * context_len * 4,
                f"{max_bs} x {context_len} x 4 B (int32)",
                "layers/attention/flashinfer_mla_backend.py "
                "FlashInferMLAAttnBackend.init_cuda_graph_state",
            )
        )
    elif backend == "flashinfer":
        up = "layers/attention/flashinfer_backend.py FlashInferAttnBackend.init_cuda_graph_state"
        # Two wrappers (and two index buffers) when the model has a sliding window.
        wrappers = 2 if spec.sliding_window else 1
        indices = flashinfer_kv_indices_layout(tokens, context_len, page_size)
        out.append(
            Allocation(
                indices.name,
                wrappers * indices.reserved_bytes,
                f"{wrappers} wrapper(s) x {tokens} x {context_len} x 4 B (int32)",
                up,
                lazy=indices,
                copies=wrappers,
            )
        )
        mask = flashinfer_custom_mask_layout(tokens, context_len)
        out.append(
            Allocation(
                mask.name,
                mask.reserved_bytes,
                f"{tokens} x {context_len} x 1 B (uint8)",
                up,
                lazy=mask,
            )
        )
    elif backend == "fa3":
        pages = -(-context_len // page_size)
        tables = 1 + (1 if spec.is_hybrid_swa else 0)
        if draft:
            # page_table_draft_decode, target_verify and draft_extend tables (+ their SWA twins).
            tables += 3 + (2 if spec.is_hybrid_swa else 0)
        up = (
            "layers/attention/flashattention_backend.py FlashAttentionBackend.init_cuda_graph_state"
        )
        layout = fa3_page_table_layout(max_bs, context_len, page_size)
        out.append(
            Allocation(
                "fa3 page tables",
                tables * layout.reserved_bytes,
                f"{tables} table(s) x {max_bs} x {pages} pages x 4 B (int32)",
                up,
                lazy=layout,
                copies=tables,
            )
        )
        if draft and speculative_topk > 1:
            out += _fa3_topk_tables(spec, max_bs, draft, context_len, up)
        strided = (1 + (2 if draft else 0)) * pages * 8
        out.append(
            Allocation("fa3 strided_indices", strided, f"{pages} pages x 8 B (int64) each", up)
        )
        if spec.architecture in LLAMA4_ARCHS and spec.sliding_window:
            where = (
                "layers/attention/local_attention.py "
                "LocalAttentionMetadataBuilder.alloc_cuda_graph_buffers"
            )
            chunk = spec.sliding_window
            for local in fa3_local_attention_layouts(max_bs, context_len, chunk, page_size):
                out.append(
                    Allocation(
                        local.name,
                        local.reserved_bytes,
                        f"{local.rows:,} x {local.items} x 4 B (int32): {max_bs} x "
                        f"ceil({context_len:,} / {chunk:,}) virtual batches",
                        where,
                        # Reserved past one chunk only: within one they have max_bs rows, a
                        # shape other fa3 buffers share, and are small.
                        lazy=local if context_len > chunk else None,
                    )
                )
    else:
        raise PlanError(f"unknown attention backend {backend!r}")
    if draft and speculative_num_steps > 1:
        out += _draft_allocations(out, backend, max_bs, speculative_topk, speculative_num_steps,
                                  context_len)  # fmt: skip
    return out


def _draft_allocations(
    target: list[Allocation], backend: str, max_bs: int, topk: int, steps: int, context_len: int
) -> list[Allocation]:
    """The draft worker's multi-step backend: triton and flashinfer share one
    ``(steps, max_bs x topk x context)`` index buffer across their step backends; fa3 builds
    ``steps - 1`` backends, each allocating what the target's does but the verify mask."""
    if backend == "triton":
        layout = triton_draft_kv_indices_layout(steps, max_bs, topk, context_len)
        where = "layers/attention/triton_backend.py TritonMultiStepDraftBackend"
    elif backend == "flashinfer":
        layout = flashinfer_draft_kv_indices_layout(steps, max_bs, topk, context_len)
        where = "layers/attention/flashinfer_backend.py FlashInferMultiStepDraftBackend"
    elif backend == "fa3":
        return [
            Allocation(
                f"draft {a.name}",
                (steps - 1) * a.bytes,
                f"{steps - 1} draft step backend(s) x ({a.formula})",
                "layers/attention/flashattention_backend.py FlashAttentionMultiStepBackend",
                lazy=a.lazy,
                copies=(steps - 1) * a.copies,
            )
            for a in target
            if a.name != VERIFY_MASK
        ]
    else:
        return []
    shape = f"{steps} x {max_bs} x {topk} x {context_len} x {layout.item_bytes} B"
    return [Allocation(layout.name, layout.reserved_bytes, shape, where, lazy=layout)]


def _fa3_topk_tables(
    spec: ModelSpec, max_bs: int, draft: int, context_len: int, up: str
) -> list[Allocation]:
    """fa3 with EAGLE top-k > 1: the draft-decode and target-verify tables of one column per
    position, the verify mask (read only with top-k > 1), and with a sliding window the
    per-draft-token verify table."""
    by_position = fa3_page_table_layout(max_bs, context_len, 1)
    out = [
        Allocation(
            "fa3 top-k page tables",
            2 * by_position.reserved_bytes,
            f"2 table(s) x {max_bs} x {context_len} positions x 4 B (int32)",
            up,
            lazy=by_position,
            copies=2,
        ),
        _verify_mask(max_bs, draft, context_len, "flashattention_backend.py"),
    ]
    if spec.is_hybrid_swa:  # allocated whatever the page size (used only at page 1)
        swa_spec = fa3_swa_spec_page_table_layout(max_bs, draft, context_len)
        out.append(
            Allocation(
                swa_spec.name,
                swa_spec.reserved_bytes,
                f"{max_bs} x {draft} x ({context_len} + {draft}) x 4 B (int32)",
                up,
                lazy=swa_spec,
            )
        )
    return out


def _verify_mask(max_bs: int, draft: int, context_len: int, where: str) -> Allocation:
    """FULL_MASK verify buffer; mirrors layers/attention/verify_mask.py tree_mask_numel."""
    layout = verify_mask_layout(max_bs, draft, context_len)
    return Allocation(
        VERIFY_MASK,
        layout.reserved_bytes,
        f"{max_bs} x {draft} x ({context_len} + {draft}) x 1 B",
        f"layers/attention/verify_mask.py maybe_create_verify_mask (via {where})",
        lazy=layout,
    )


# --------------------------------------------------------------------------------------------
# The auto decision
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AutoDecision:
    """What `auto` does: the mode, the context it serves, and why."""

    mode: str
    effective_context: int
    clamped: bool
    reason: str


def decide_auto(
    *,
    requested_context: int | None,
    model_max_context: int,
    max_context_one_request: int,
    context_scaled_bytes_static: int,
    budget_bytes: int,
) -> AutoDecision:
    """Pick static or segmented, clamping the context to what one request can hold.

    requested_context None means the model's own context (model_max_context), as upstream.
    max_context_one_request is the KV tokens the pool holds, page-rounded, already bounded by
    the model maximum unless the caller allows longer contexts. context_scaled_bytes_static
    is the sum of static mode's context-sized start-up allocations at the target context;
    when the context is clamped it is rescaled in proportion (they are linear in context up
    to a few tokens of headroom). Static is kept when that sum is at most
    AUTO_STATIC_MAX_SHARE of the KV budget.
    """
    if budget_bytes <= 0:
        raise PlanError(f"budget_bytes must be positive (got {budget_bytes})")
    target = model_max_context if requested_context is None else requested_context
    if target <= 0:
        raise PlanError(f"context length must be positive (got {target})")
    if max_context_one_request <= 0:
        raise PlanError(f"the KV pool holds no full request ({max_context_one_request} tokens)")
    clamped = target > max_context_one_request
    effective = max_context_one_request if clamped else target
    scaled = context_scaled_bytes_static
    if clamped:
        scaled = context_scaled_bytes_static * effective // target
    share = scaled / budget_bytes
    prefix = ""
    if clamped:
        prefix = (
            f"context {target} clamped to {effective}: one request can hold at most "
            f"{max_context_one_request} tokens on this device; "
        )
    if share <= AUTO_STATIC_MAX_SHARE:
        mode = "static"
        why = (
            f"static: context-scaled start-up allocations are {scaled} B, "
            f"{share:.1%} of the {budget_bytes} B KV budget (<= {AUTO_STATIC_MAX_SHARE:.0%})"
        )
    else:
        mode = "segmented"
        why = (
            f"segmented: context-scaled start-up allocations would be {scaled} B, "
            f"{share:.1%} of the {budget_bytes} B KV budget (> {AUTO_STATIC_MAX_SHARE:.0%})"
        )
    return AutoDecision(
        mode=mode, effective_context=effective, clamped=clamped, reason=prefix + why
    )


# --------------------------------------------------------------------------------------------
# The whole plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanInputs:
    """Everything a plan depends on. None means "upstream's default"."""

    model: Mapping[str, Any] | str | Path
    device_memory_bytes: int
    tp: int = 1
    pp: int = 1
    attn_dp: int = 1
    mem_fraction_static: float | None = None
    kv_cache_dtype: str = "auto"
    page_size: int = 1
    max_running_requests: int | None = None
    cuda_graph_max_bs: int | None = None
    disable_cuda_graph: bool = False
    attention_backend: str = "fa3"
    speculative_draft_tokens: int = 0
    speculative_eagle_topk: int = 1
    speculative_num_steps: int = 0
    context_length: int | None = None
    allow_longer_context: bool = False
    max_total_tokens: int | None = None
    swa_full_tokens_ratio: float = DEFAULT_SWA_FULL_TOKENS_RATIO
    weight_bytes_per_gpu: int | None = None
    pre_load_overhead_bytes: int = DEFAULT_PRE_LOAD_OVERHEAD_BYTES
    chunked_prefill_size: int | None = None


@dataclass(frozen=True)
class ModePlan:
    """Start-up cost of one mode at the planned context."""

    mode: str
    context_len: int
    max_num_reqs: int
    cuda_graph_max_bs: int
    allocations: list[Allocation]
    context_scaled_reserved_bytes: int
    context_scaled_committed_bytes: int
    fits_in_slack: bool
    # Segmented on a GPU: per lazy cuda-graph buffer, reserved bytes and what capture and one
    # request of the whole context commit (`lazy_graph_buffer_figures`).
    lazy_graph_buffers: list[dict[str, Any]] = field(default_factory=list)


def lazy_graph_buffer_figures(
    allocations: list[Allocation], captured_bs: int, context_len: int, tokens_per_row: int = 1
) -> list[dict[str, Any]]:
    """Reserved bytes of each lazy cuda-graph buffer, and what it commits at capture and for
    one request of ``context_len`` tokens: the same arithmetic the hooks commit by."""
    whole_context = GraphBatch(1, context_len, context_len, max(1, tokens_per_row))
    capture = capture_batch(captured_bs, tokens_per_row)
    return [
        {
            "name": a.name,
            "reserved_bytes": a.bytes,
            "capture_commit_bytes": a.segmented_commit_bytes(capture),
            "one_full_context_request_commit_bytes": a.segmented_commit_bytes(whole_context),
        }
        for a in allocations
        if a.lazy is not None
    ]


@dataclass(frozen=True)
class SegmentedKv:
    """Segmented mode's KV pool (mechanism b) per GPU, and one request of the planned context.

    The pool is reserved at upstream's size; at start one segment of each (sub-)pool is
    committed. One request commits its KV: every token in full-attention (or MLA) layers, and
    in sliding-window layers only the window plus one prefill chunk (the SWA radix cache frees
    older slots). ``headroom_bytes`` is what the device has left, after weights, for the
    request's KV and segmented mode's committed context-scaled allocations: negative means
    it cannot fit at any --mem-fraction-static (activations are not modelled)."""

    pool_kind: str  # "mha", "hybrid_swa" or "mla"
    segment_tokens: int
    committed_at_start_bytes: int
    reserved_bytes: int
    request_context: int
    request_full_tokens: int
    request_swa_tokens: int
    request_kv_bytes: int
    request_fits_pool: bool  # the reserved pool (upstream's sizing) holds it
    headroom_bytes: int
    # What would make upstream's sizing hold it: the largest --swa-full-tokens-ratio (hybrid
    # only) and the smallest --mem-fraction-static; None where no setting can.
    swa_full_tokens_ratio_for_request: float | None
    mem_fraction_static_for_request: float | None


def _segment_tokens(cap_tokens: int, page_size: int, row_bytes: list[int]) -> int:
    from sglang_kvalloc.core.segments import aligned_segment_tokens, default_segment_tokens

    size = default_segment_tokens(cap_tokens, page_size)
    return min(aligned_segment_tokens(size, page_size, row_bytes, GPU_VMM_GRANULARITY), cap_tokens)


def segmented_kv(
    spec: ModelSpec,
    cell: KVPerToken,
    pool: PoolSize,
    *,
    context_len: int,
    page_size: int,
    chunked_prefill_size: int,
    pre_load_bytes: int,
    weight_bytes: int,
    mm_reservation_bytes: int,
    segmented_committed_bytes: int,
) -> SegmentedKv:
    """The `SegmentedKv` figures (see there) for one configuration."""
    full_cell = cell.full_attention + cell.mla
    hybrid = bool(cell.swa_layers and cell.full_layers)
    kind = "mla" if spec.attention == "mla" else "hybrid_swa" if hybrid else "mha"
    cap_full = pool.max_total_num_tokens + page_size
    start = 0
    seg_full = 0
    for tokens, per_layer, layers in (
        (cap_full, cell.per_layer_full, cell.full_layers),
        (pool.swa_tokens + page_size, cell.per_layer_swa, cell.swa_layers if hybrid else 0),
    ):
        if not layers or tokens <= page_size:
            continue
        # K and V per layer for MHA (half the per-layer bytes each); one latent row for MLA.
        rows = [per_layer] * layers if kind == "mla" else [per_layer // 2] * (2 * layers)
        seg = _segment_tokens(tokens, page_size, rows)
        seg_full = seg_full or seg
        start += seg * sum(rows)
    swa_need = 0
    if hybrid:
        window = spec.sliding_window or context_len
        swa_need = min(context_len, window + chunked_prefill_size + page_size)
    kv = context_len * full_cell + swa_need * cell.sliding_window
    fits_pool = context_len <= pool.max_total_num_tokens and (
        not hybrid or swa_need <= pool.swa_tokens
    )
    headroom = pre_load_bytes - weight_bytes - mm_reservation_bytes - kv - segmented_committed_bytes
    ratio = None
    if hybrid:
        ratio = math.ceil(swa_need / context_len * 1000) / 1000
    # budget = pre_load - weights - pre_load x (1 - mfs) - mm >= kv  (kv_budget_bytes)
    mfs = 1 - (pre_load_bytes - weight_bytes - mm_reservation_bytes - kv) / pre_load_bytes
    mfs_needed = math.ceil(mfs * 1000) / 1000 if mfs <= 1 else None
    return SegmentedKv(
        pool_kind=kind,
        segment_tokens=seg_full,
        committed_at_start_bytes=start,
        reserved_bytes=pool.pool_bytes,
        request_context=context_len,
        request_full_tokens=context_len,
        request_swa_tokens=swa_need,
        request_kv_bytes=kv,
        request_fits_pool=fits_pool,
        headroom_bytes=headroom,
        swa_full_tokens_ratio_for_request=ratio,
        mem_fraction_static_for_request=mfs_needed,
    )


@dataclass(frozen=True)
class Plan:
    """Planner output for one configuration."""

    model: str
    architecture: str
    attention: str
    kv_cache_dtype: str
    kv_bytes_per_element: int
    tp: int
    pp: int
    attn_dp: int
    attn_tp: int
    page_size: int
    attention_backend: str
    device_memory_bytes: int
    mem_fraction_static: float
    mem_fraction_static_auto: bool
    pre_load_bytes: int
    weight_bytes_per_gpu: int
    slack_bytes: int
    budget_bytes: int
    kv_per_token: KVPerToken
    max_total_num_tokens: int
    swa_tokens: int
    pool_bytes: int
    model_max_context: int
    requested_context: int | None
    planned_context: int
    max_context_one_request: int
    upstream_refusal: str | None
    static: ModePlan
    segmented: ModePlan
    segmented_kv: SegmentedKv
    auto: AutoDecision
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def _validate(inputs: PlanInputs) -> None:
    if inputs.device_memory_bytes <= 0:
        raise PlanError(f"device memory must be positive (got {inputs.device_memory_bytes} B)")
    if inputs.page_size < 1:
        raise PlanError(f"page size must be >= 1 (got {inputs.page_size})")
    if inputs.context_length is not None and inputs.context_length <= 0:
        raise PlanError(f"context length must be positive (got {inputs.context_length})")
    if inputs.mem_fraction_static is not None and not 0 < inputs.mem_fraction_static <= 1:
        raise PlanError(f"mem_fraction_static must be in (0, 1] (got {inputs.mem_fraction_static})")
    if inputs.attention_backend not in ATTENTION_BACKENDS:
        raise PlanError(
            f"unknown attention backend {inputs.attention_backend!r} "
            f"(choose from {', '.join(ATTENTION_BACKENDS)})"
        )
    if inputs.speculative_draft_tokens < 0:
        raise PlanError(f"draft tokens must be >= 0 (got {inputs.speculative_draft_tokens})")
    if inputs.speculative_num_steps < 0:
        raise PlanError(f"draft steps must be >= 0 (got {inputs.speculative_num_steps})")
    if inputs.speculative_eagle_topk < 1:
        raise PlanError(f"EAGLE top-k must be >= 1 (got {inputs.speculative_eagle_topk})")
    if inputs.max_running_requests is not None and inputs.max_running_requests < 1:
        raise PlanError(f"max running requests must be >= 1 (got {inputs.max_running_requests})")
    if inputs.cuda_graph_max_bs is not None and inputs.cuda_graph_max_bs < 1:
        raise PlanError(f"cuda-graph max bs must be >= 1 (got {inputs.cuda_graph_max_bs})")
    if not 0 < inputs.swa_full_tokens_ratio <= 1:
        raise PlanError(
            f"swa_full_tokens_ratio must be in (0, 1] (got {inputs.swa_full_tokens_ratio})"
        )
    if inputs.max_total_tokens is not None and inputs.max_total_tokens <= 0:
        raise PlanError(f"max total tokens must be positive (got {inputs.max_total_tokens})")
    if inputs.pre_load_overhead_bytes < 0:
        raise PlanError("pre-load overhead must be >= 0")


def plan(inputs: PlanInputs) -> Plan:
    """Compute the static and segmented start-up plans and the auto decision.

    Follows mem_cache/kv_cache_configurator.py _resolve_memory_pool_config: budget
    (_profile_available_bytes) -> pool (config_from_budget, min over PP stages as
    _apply_token_constraints' all-reduce) -> request slots (resolve_max_num_reqs) ->
    req_to_token (_build_req_to_token_pool) -> cuda-graph buffers (backend
    init_cuda_graph_state).
    """
    _validate(inputs)
    cfg = load_model_config(inputs.model)
    spec = model_spec_from_config(cfg)
    attn_tp = check_parallel(spec, inputs.tp, inputs.pp, inputs.attn_dp)
    backend = inputs.attention_backend
    if spec.architecture in LLAMA4_ARCHS and backend not in LLAMA4_BACKENDS:
        # arg_groups/model_hook.py asserts this for Llama-4 on GPU.
        raise PlanError(
            f"upstream requires fa3 or triton (of this planner's backends) for Llama-4, "
            f"got {backend}"
        )
    kv_bytes = kv_dtype_bytes(inputs.kv_cache_dtype, spec.dtype_bytes)
    gpu_mem_mib = inputs.device_memory_bytes / MIB
    notes: list[str] = []

    # Context upstream would run with (configs/model_config.py _derive_context_length).
    requested = inputs.context_length
    planned = spec.model_max_context if requested is None else requested
    refusal = None
    if requested is not None and requested > spec.model_max_context:
        if not inputs.allow_longer_context:
            refusal = (
                f"upstream refuses context_length {requested} > derived {spec.model_max_context} "
                "unless SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1"
            )

    cuda_graph = not inputs.disable_cuda_graph
    graph_bs = inputs.cuda_graph_max_bs or default_cuda_graph_max_bs(
        gpu_mem_mib, inputs.tp, inputs.max_running_requests
    )
    mfs_auto = inputs.mem_fraction_static is None
    if mfs_auto:
        mfs = auto_mem_fraction_static(
            gpu_mem_mib=gpu_mem_mib,
            tp=inputs.tp,
            pp=inputs.pp,
            attn_dp=inputs.attn_dp,
            cuda_graph_max_bs=graph_bs,
            chunked_prefill_size=inputs.chunked_prefill_size,
            use_mla=spec.attention == "mla",
            cuda_graph=cuda_graph,
            vision_layers=spec.vision_layers if spec.is_multimodal else 0,
            vision_hidden=spec.vision_hidden,
        )
    else:
        mfs = float(inputs.mem_fraction_static)  # type: ignore[arg-type]

    pre_load = inputs.device_memory_bytes - inputs.pre_load_overhead_bytes
    if pre_load <= 0:
        raise PlanError(
            f"device memory {inputs.device_memory_bytes} B does not exceed the pre-load "
            f"overhead {inputs.pre_load_overhead_bytes} B"
        )
    mm_reservation = VLM_CACHE_SIZE_MB * MIB if spec.is_multimodal else 0

    # One pool size per PP stage; upstream all-reduces MIN across stages.
    best: tuple[PoolSize, KVPerToken, int, int] | None = None
    for rank in range(inputs.pp):
        layer_range = pp_layer_range(spec.num_layers, rank, inputs.pp)
        weights = inputs.weight_bytes_per_gpu
        if weights is None:
            weights = estimate_weight_bytes_per_gpu(
                spec, tp=inputs.tp, attn_tp=attn_tp, layer_range=layer_range
            )
        budget = kv_budget_bytes(
            pre_load_bytes=pre_load,
            weight_bytes=weights,
            mem_fraction_static=mfs,
            mm_reservation_bytes=mm_reservation,
        )
        cell = kv_per_token(
            spec,
            attn_tp=attn_tp,
            kv_bytes=kv_bytes,
            layer_range=layer_range,
            swa_full_tokens_ratio=inputs.swa_full_tokens_ratio,
        )
        pool = pool_from_budget(
            budget,
            cell,
            page_size=inputs.page_size,
            swa_full_tokens_ratio=inputs.swa_full_tokens_ratio,
            max_total_tokens=inputs.max_total_tokens,
        )
        if best is None or pool.max_total_num_tokens < best[0].max_total_num_tokens:
            best = (pool, cell, budget, weights)
    assert best is not None
    pool, cell, budget, weights = best
    if pool.max_total_num_tokens < inputs.page_size:
        raise PlanError(
            f"KV budget of {budget} B per GPU holds {int(budget // max(cell.pool_cell, 1))} "
            f"tokens at {cell.pool_cell:g} B/token; one page of {inputs.page_size} tokens needs "
            f"{math.ceil(cell.pool_cell * inputs.page_size)} B"
        )
    if spec.is_hybrid_swa and cell.full_layers and spec.sliding_window:
        # pool_configurator.py MemoryPoolConfigurator.validate_swa_pool_size
        if spec.sliding_window + inputs.page_size >= pool.swa_tokens:
            raise PlanError(
                f"SWA pool ({pool.swa_tokens} tokens) cannot hold one request: it needs more "
                f"than sliding window {spec.sliding_window} + page {inputs.page_size}"
            )

    one_request = pool.max_total_num_tokens // inputs.page_size * inputs.page_size
    if not inputs.allow_longer_context:
        one_request = min(one_request, spec.model_max_context)

    slack = int(pre_load * (1 - mfs))

    def mode_plan(mode: str, context_len: int) -> ModePlan:
        reqs = resolve_max_num_reqs(
            pool.max_total_num_tokens,
            context_len,
            max_running_requests=inputs.max_running_requests,
            attn_dp=inputs.attn_dp,
        )
        captured_bs = min(graph_bs, reqs) if cuda_graph else 0
        allocs = [
            req_to_token_allocation(
                reqs, context_len, req_to_token_extra(inputs.speculative_draft_tokens)
            )
        ]
        allocs += cuda_graph_allocations(
            spec,
            backend=backend,
            max_bs=captured_bs,
            context_len=context_len,
            page_size=inputs.page_size,
            speculative_draft_tokens=inputs.speculative_draft_tokens,
            speculative_topk=inputs.speculative_eagle_topk,
            speculative_num_steps=inputs.speculative_num_steps,
        )
        reserved = sum(a.bytes for a in allocs)
        if mode == "static":
            committed = reserved
        else:
            committed = segmented_committed_bytes(
                allocs,
                reqs,
                on_gpu=backend != "torch_native",
                captured_bs=captured_bs,
                tokens_per_row=inputs.speculative_draft_tokens,
            )
        return ModePlan(
            mode=mode,
            context_len=context_len,
            max_num_reqs=reqs,
            cuda_graph_max_bs=captured_bs,
            allocations=allocs,
            context_scaled_reserved_bytes=reserved,
            context_scaled_committed_bytes=committed,
            fits_in_slack=committed <= slack,
            lazy_graph_buffers=(
                lazy_graph_buffer_figures(
                    allocs, captured_bs, context_len, inputs.speculative_draft_tokens
                )
                if mode == "segmented" and backend != "torch_native"
                else []
            ),
        )

    static = mode_plan("static", planned)
    segmented = mode_plan("segmented", planned)
    kv_plan = segmented_kv(
        spec,
        cell,
        pool,
        context_len=planned,
        page_size=inputs.page_size,
        chunked_prefill_size=inputs.chunked_prefill_size
        or default_chunked_prefill_size(gpu_mem_mib),
        pre_load_bytes=pre_load,
        weight_bytes=weights,
        mm_reservation_bytes=mm_reservation,
        segmented_committed_bytes=segmented.context_scaled_committed_bytes,
    )
    decision = decide_auto(
        requested_context=requested,
        model_max_context=spec.model_max_context,
        max_context_one_request=one_request,
        context_scaled_bytes_static=static.context_scaled_reserved_bytes,
        budget_bytes=pool.pool_bytes,  # what the pool takes (the server compares the same)
    )
    if inputs.weight_bytes_per_gpu is None:
        notes.append("weight bytes per GPU are estimated from the parameter count (bf16/fp16)")
    notes.append(
        f"pre-load free memory assumed = device memory - {inputs.pre_load_overhead_bytes} B"
    )
    if inputs.speculative_draft_tokens:
        notes.append(
            "the draft model's own KV pool is not included"
            + (
                "; its cuda-graph buffers are (draft steps given)"
                if inputs.speculative_num_steps > 1
                else ", nor its cuda-graph buffers (give --speculative-num-steps)"
            )
        )
    return Plan(
        model=spec.name,
        architecture=spec.architecture,
        attention=spec.attention,
        kv_cache_dtype=inputs.kv_cache_dtype,
        kv_bytes_per_element=kv_bytes,
        tp=inputs.tp,
        pp=inputs.pp,
        attn_dp=inputs.attn_dp,
        attn_tp=attn_tp,
        page_size=inputs.page_size,
        attention_backend=backend,
        device_memory_bytes=inputs.device_memory_bytes,
        mem_fraction_static=mfs,
        mem_fraction_static_auto=mfs_auto,
        pre_load_bytes=pre_load,
        weight_bytes_per_gpu=weights,
        slack_bytes=slack,
        budget_bytes=budget,
        kv_per_token=cell,
        max_total_num_tokens=pool.max_total_num_tokens,
        swa_tokens=pool.swa_tokens,
        pool_bytes=pool.pool_bytes,
        model_max_context=spec.model_max_context,
        requested_context=requested,
        planned_context=planned,
        max_context_one_request=one_request,
        upstream_refusal=refusal,
        static=static,
        segmented=segmented,
        segmented_kv=kv_plan,
        auto=decision,
        notes=notes,
    )
