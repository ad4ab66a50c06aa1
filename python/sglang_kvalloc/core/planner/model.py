"""Model shapes: what the planner reads from a HF config.json, the parallel layout, and the
KV bytes per token per GPU (each mirrors the upstream function its docstring names)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sglang_kvalloc.core.planner.common import PlanError

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
# configs/model_config.py ModelConfig.__init__ mm_disabled_models: served text-only unless
# --enable-multimodal.
MM_DISABLED_ARCHS: frozenset[str] = frozenset(
    {
        "Gemma3ForConditionalGeneration",
        "Llama4ForConditionalGeneration",
        "Step3VLForConditionalGeneration",
        "InklingForConditionalGeneration",
    }
)
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
    is_multimodal: bool = False  # has a vision tower; whether it is served: serves_multimodal
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
    """Directory of the model configs the planner CLI ships (not part of the series: where
    it is absent, a built-in name finds nothing)."""
    return Path(__file__).resolve().parents[2] / "configs"


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


def serves_multimodal(spec: ModelSpec, enable_multimodal: bool | None) -> bool:
    """Whether upstream serves the model's vision side, as ``ModelConfig.is_multimodal`` says:
    ``--enable-multimodal`` unset means on, except for the archs upstream serves text-only by
    default (Llama-4 among them). Only then does it reduce ``--mem-fraction-static`` for the
    vision model and reserve its embedding cache out of the KV budget."""
    if enable_multimodal is None:
        enable_multimodal = spec.architecture not in MM_DISABLED_ARCHS
    return enable_multimodal and spec.is_multimodal


def keeps_prefill_cuda_graphs(spec: ModelSpec, enable_multimodal: bool | None) -> bool:
    """Upstream disables prefill (breakable) CUDA graphs for a served vision model unless its
    arch is on its allowlist (configs/model_config.py
    multimodal_breakable_cuda_graph_supported_model_archs), which has none of this planner's."""
    return not serves_multimodal(spec, enable_multimodal)


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
