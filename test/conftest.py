"""Shared fixtures: the built-in tiny model (float32, fixed seed), built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Upstream decides at import time which kernels its layers use: the CPU engine's, here.
os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sglang_kvalloc.tiny_model import ensure

    override = os.environ.get("SGLANG_KVALLOC_TINY_MODEL")
    out = Path(override) if override else tmp_path_factory.mktemp("models") / "tiny-llama-f32"
    return ensure(out, dtype="float32")


@pytest.fixture(scope="session")
def hf_model(tiny_model: Path):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), torch_dtype=torch.float32)
    model.eval()
    return model


def hf_greedy(model, input_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation from HF transformers, the reference for token parity."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([input_ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=2,
        )
    return out[0, len(input_ids) :].tolist()


def parity_prompts(vocab_size: int, seed: int = 7) -> list[list[int]]:
    """Token-id prompts: short ones and one over 2,000 tokens."""
    import random

    rng = random.Random(seed)
    lengths = [5, 37, 300, 2300]
    # ids 3.. avoid the special tokens (bos=0, eos=1, pad=2).
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in lengths]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: starts real servers on 127.0.0.1 (test/e2e)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything under test/e2e is `e2e` (`-m "not e2e"` keeps the fast lane)."""
    for item in items:
        if "e2e" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.e2e)
