"""The kit's model: a random-weight Llama of Llama-3.2-1B's size with head dim 128 and GQA
(16 layers, hidden 2048, 16 query heads, 8 KV heads, MLP 8192; about 1.0 B parameters), bf16,
built on the GPU in seconds, with sglang-kvalloc's locally trained tokenizer. Nothing is
downloaded. Its KV cache costs 64 KiB per token (16 layers x K and V x 8 heads x 128 x 2 B).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

SHAPE: dict[str, Any] = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
}
SEED = 2025


def kv_bytes_per_token(shape: dict[str, Any] = SHAPE, dtype_bytes: int = 2) -> int:
    """K and V of every layer for one token."""
    layers, heads, dim = shape["num_hidden_layers"], shape["num_key_value_heads"], shape["head_dim"]
    return 2 * layers * heads * dim * dtype_bytes


def init_std(name: str, hidden: int) -> float:
    """Normal init per weight, chosen so the tokens depend on what the KV cache holds (on a
    smaller copy in float32, changing one token 20 to 300 positions back changed the next 16
    greedy tokens 3 times out of 3; with HF's 0.02 everywhere the output repeats one token and
    ignores the context): embeddings of std 1 keep tokens apart, q/k of std 1.8/sqrt(hidden)
    give attention scores of std about 3 (sharp), v/o of 1.13/sqrt(hidden) carry what is
    attended; lm_head 0.05 spreads the logits (std about 2.2), so greedy ties are rare."""
    if name.startswith("lm_head"):
        return 0.05
    if "embed_tokens" in name:
        return 1.0
    if name.endswith(("q_proj.weight", "k_proj.weight")):
        return 1.8 / math.sqrt(hidden)
    if name.endswith(("v_proj.weight", "o_proj.weight")):
        return 1.13 / math.sqrt(hidden)
    return 0.02


def build(
    out: Path, device: str = "cuda", dtype: str = "bfloat16", shape: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write config, safetensors weights and tokenizer into ``out``; returns what was built.
    ``shape`` overrides SHAPE (the CPU proof builds a small one)."""
    shape = {**SHAPE, **(shape or {})}
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sglang_kvalloc_harness.tiny_model import build_tokenizer

    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out, seed=SEED)
    config = LlamaConfig(
        vocab_size=vocab,
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
        initializer_range=0.02,
        **shape,
    )
    torch.manual_seed(SEED)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, init_std(name, shape["hidden_size"]))
    if device == "cuda":
        torch.cuda.synchronize()
    built = time.monotonic() - started
    model.save_pretrained(str(out), safe_serialization=True)
    cfg = json.loads((out / "config.json").read_text())
    cfg["torch_dtype"] = cfg["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    params = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {
        "path": str(out),
        "parameters": params,
        "vocab_size": vocab,
        "dtype": dtype,
        "shape": shape,
        "kv_bytes_per_token": kv_bytes_per_token(shape),
        "build_seconds": round(built, 1),
        "total_seconds": round(time.monotonic() - started, 1),
        "weights_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
    }
