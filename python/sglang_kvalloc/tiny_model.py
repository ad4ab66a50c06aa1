"""Build the built-in tiny Llama offline: random weights and a locally trained tokenizer.

Nothing is downloaded. The same seed gives the same files, so tests and benchmarks that
build the model in different places compare like with like.

    python -m sglang_kvalloc.tiny_model --out models/tiny-llama [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

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


def build(out: Path, dtype: str = "float32", seed: int = DEFAULT_SEED) -> Path:
    """Write config, weights (safetensors) and tokenizer of the tiny Llama into `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out, seed=seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
        torch_dtype=dtype,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
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
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "BUILT_BY_SGLANG_KVALLOC").write_text(f"seed={seed} dtype={dtype}\n")
    return out


def ensure(out: Path, dtype: str = "float32", seed: int = DEFAULT_SEED) -> Path:
    """Build the model unless an identical build is already in `out`."""
    marker = out / "BUILT_BY_SGLANG_KVALLOC"
    if marker.exists() and marker.read_text() == f"seed={seed} dtype={dtype}\n":
        return out
    return build(out, dtype=dtype, seed=seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the model to")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    args = parser.parse_args(argv)
    path = (build if args.force else ensure)(args.out, dtype=args.dtype, seed=args.seed)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
