"""Shared fixtures: the built-in tiny model (float32, fixed seed), built once per session."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from sglang_kvalloc_harness.serving import LocalServer

# Upstream decides at import time which kernels its layers use: the CPU engine's, here.
os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
# The test support modules (the fake CUDA driver and its kernel queue) import by name.
SUPPORT_DIR = Path(__file__).resolve().parent / "support"
sys.path.insert(0, str(SUPPORT_DIR))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sglang_kvalloc_harness.tiny_model import ensure

    override = os.environ.get("SGLANG_KVALLOC_TINY_MODEL")
    out = Path(override) if override else tmp_path_factory.mktemp("models") / "tiny-llama-f32"
    return ensure(out, dtype="float32")


@pytest.fixture(scope="session")
def real_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct, built offline (float32); kept beside the venv by scripts/test.sh."""
    from sglang_kvalloc_harness.real_model import MODEL_NAME, ensure

    override = os.environ.get("SGLANG_KVALLOC_REAL_MODEL")
    out = Path(override) if override else tmp_path_factory.mktemp("models") / MODEL_NAME
    return ensure(out)


@pytest.fixture(scope="session")
def hf_model(tiny_model: Path):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), torch_dtype=torch.float32)
    model.eval()
    return model


# The static server that several e2e tests compare with: float32, a 4,096-token context, four
# request slots (so auto at these flags is static too), a 65,536-token pool.
REFERENCE_STATIC_ARGS = ["--kv-alloc-mode", "static", "--context-length", "4096"]
REFERENCE_STATIC_ARGS += ["--max-running-requests", "4", "--max-total-tokens", "65536"]
REFERENCE_STATIC_ARGS += ["--dtype", "float32"]


@dataclass
class ReferenceStatic:
    """The shared static server and its resident memory 3 s after start, before any request."""

    server: LocalServer
    start_rss_bytes: int


@pytest.fixture(scope="session")
def _reference_static_session(tiny_model: Path) -> Iterator[ReferenceStatic]:
    """Started once per session and paused (SIGSTOP) between the tests that use it: an idle
    CPU-engine scheduler busy-polls a core."""
    from sglang_kvalloc_harness.serving import LocalServer

    with LocalServer(tiny_model, args=REFERENCE_STATIC_ARGS) as server:
        time.sleep(3)
        reference = ReferenceStatic(server=server, start_rss_bytes=server.rss_bytes())
        server.pause()
        yield reference


@pytest.fixture
def reference_static(_reference_static_session: ReferenceStatic) -> Iterator[ReferenceStatic]:
    """The shared static server, running for the test that asks for it."""
    _reference_static_session.server.resume()
    try:
        yield _reference_static_session
    finally:
        _reference_static_session.server.pause()


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
