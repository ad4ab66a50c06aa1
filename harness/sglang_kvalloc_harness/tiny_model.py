"""Build the built-in tiny models offline: random weights and a locally trained tokenizer.

Nothing is downloaded. The same seed gives the same files, so tests and benchmarks that
build the model in different places compare like with like. Three architectures, one per KV
pool kind upstream builds (each one 0.5.23's CPU engine serves with torch_native):

- ``llama``: plain MHA pool (the default).
- ``mellum``: hybrid sliding-window attention (``MellumForCausalLM``, three sliding-window
  layers per full one), upstream's ``SWAKVPool`` and ``SWATokenToKVPoolAllocator``.
- ``deepseek-v3``: MLA (``DeepseekV3ForCausalLM``, dense layers), upstream's
  ``MLATokenToKVPool``.

    python -m sglang_kvalloc_harness.tiny_model --out models/tiny-llama [--dtype float32] [--arch A]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

DEFAULT_SEED = 1234
VOCAB_SIZE = 2048
# Large enough for the 32K-token parity prompts plus their outputs; the rotary cache is
# sized by this number, so it is kept modest rather than set to the 10M test contexts.
MAX_POSITION_EMBEDDINGS = 65536

_SYLLABLES = [
    "ka", "to", "ri", "me", "su", "na", "lo", "pe", "vi", "da", "zu", "ho", "mi", "te",
    "ra", "no", "shi", "ku", "fe", "ba", "go", "le", "ni", "pa", "qu", "we", "xi", "yo",
]  # fmt: skip


def _corpus(seed: int, n_sentences: int = 4000) -> list[str]:
    """A deterministic pseudo-language: enough structure for BPE merges to be stable."""
    rng = random.Random(seed)
    words = sorted(
        {"".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(3000)}
    )
    words += ["the", "a", "of", "and", "to", "in", "is", "hello", "world", "memory", "cache"]
    lines = []
    for _ in range(n_sentences):
        n = rng.randint(4, 18)
        sentence = " ".join(rng.choice(words) for _ in range(n))
        punct = rng.choice([".", "!", "?", ",", ";", ":", " 42.", " 7."])
        lines.append(sentence.capitalize() + punct)
    return lines


def build_tokenizer(out: Path, seed: int = DEFAULT_SEED, vocab_size: int = VOCAB_SIZE) -> int:
    """Train a byte-level BPE tokenizer and save it in HF `PreTrainedTokenizerFast` form."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|pad|>",
    )
    fast.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    )
    fast.save_pretrained(str(out))
    return len(fast)


ARCHS = ("llama", "mellum", "deepseek-v3")
# Mellum's sliding window: small, so test prompts run far past it.
MELLUM_SLIDING_WINDOW = 64


def _config(arch: str, vocab: int, dtype: str) -> Any:
    common: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=10000.0,
            torch_dtype=dtype,
            **common,
        )
    if arch == "mellum":
        from transformers import MellumConfig

        layers = 4
        return MellumConfig(
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=MELLUM_SLIDING_WINDOW,
            layer_types=["sliding_attention"] * 3 + ["full_attention"],
            mlp_layer_types=["dense"] * layers,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            architectures=["MellumForCausalLM"],
            **common,
        )
    from transformers import DeepseekV3Config

    layers = 2
    return DeepseekV3Config(
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        moe_intermediate_size=32,
        n_shared_experts=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=layers,  # every layer dense: the CPU engine's MoE is not needed
        kv_lora_rank=32,
        q_lora_rank=48,
        qk_rope_head_dim=16,
        qk_nope_head_dim=32,
        v_head_dim=32,
        # The CPU engine's RoPE factory takes DeepSeek's yarn only; factor 1 is plain RoPE.
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 1.0,
            "original_max_position_embeddings": MAX_POSITION_EMBEDDINGS,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        architectures=["DeepseekV3ForCausalLM"],
        **common,
    )


def _model_class(arch: str) -> Any:
    import transformers

    name = {
        "llama": "LlamaForCausalLM",
        "mellum": "MellumForCausalLM",
        "deepseek-v3": "DeepseekV3ForCausalLM",
    }
    return getattr(transformers, name[arch])


def build(out: Path, dtype: str = "float32", seed: int = DEFAULT_SEED, arch: str = "llama") -> Path:
    """Write config, weights (safetensors) and tokenizer of a tiny model into `out`."""
    import torch

    if arch not in ARCHS:
        raise ValueError(f"unknown tiny-model architecture {arch!r}; choose from {ARCHS}")
    out.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out, seed=seed)
    config = _config(arch, vocab, dtype)
    torch.manual_seed(seed)
    model = _model_class(arch)(config)
    # Larger-than-default init so logits are far apart: greedy ties cannot flip tokens.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(str(out), safe_serialization=True)
    cfg = json.loads((out / "config.json").read_text())
    cfg["torch_dtype"] = dtype
    cfg["dtype"] = dtype
    if arch == "deepseek-v3":
        cfg["moe_layer_freq"] = 1  # upstream's deepseek_v2.py reads it; HF's V3 config has none
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "BUILT_BY_SGLANG_KVALLOC").write_text(_marker(seed, dtype, arch))
    return out


def _marker(seed: int, dtype: str, arch: str) -> str:
    # The llama marker keeps its earlier form, so existing builds stay valid.
    return f"seed={seed} dtype={dtype}\n" + ("" if arch == "llama" else f"arch={arch}\n")


def ensure(
    out: Path, dtype: str = "float32", seed: int = DEFAULT_SEED, arch: str = "llama"
) -> Path:
    """Build the model unless an identical build is already in `out`."""
    marker = out / "BUILT_BY_SGLANG_KVALLOC"
    if marker.exists() and marker.read_text() == _marker(seed, dtype, arch):
        return out
    return build(out, dtype=dtype, seed=seed, arch=arch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the model to")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--arch", choices=ARCHS, default="llama", help="KV pool kind to exercise")
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    args = parser.parse_args(argv)
    path = (build if args.force else ensure)(
        args.out, dtype=args.dtype, seed=args.seed, arch=args.arch
    )
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
