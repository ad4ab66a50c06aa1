"""The sgl_kernel CPU fallback: correct where it computes, loud where it cannot."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sglang_kvalloc_harness.kernels import sgl_kernel_cpu


def test_assign_req_to_token_pool_matches_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    req_to_token = torch.zeros((6, 32), dtype=torch.int32)
    rows = torch.tensor([4, 1, 3])
    start = torch.tensor([0, 5, 30])
    end = torch.tensor([7, 9, 32])
    total = int((end - start).sum())
    out_cache_loc = torch.randint(1, 1000, (total,), generator=gen)
    expected = req_to_token.clone()
    offset = 0
    for r, s, e in zip(rows.tolist(), start.tolist(), end.tolist(), strict=True):
        expected[r, s:e] = out_cache_loc[offset : offset + e - s].to(torch.int32)
        offset += e - s
    sgl_kernel_cpu.assign_req_to_token_pool_cpu(
        rows, req_to_token, start, end, out_cache_loc, req_to_token.shape[1]
    )
    assert torch.equal(req_to_token, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_all_layer_kv_cache_matches_reference(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    layers = [torch.randn((50, 2, 8), generator=gen).to(dtype) for _ in range(3)]
    expected = [t.clone() for t in layers]
    # Overlapping source and target sets: all sources are read before any target is written.
    src = torch.tensor([3, 4, 5, 10])
    tgt = torch.tensor([4, 5, 6, 49])
    for t in expected:
        t[tgt] = t[src].clone()
    ptrs = torch.tensor([t.data_ptr() for t in layers], dtype=torch.int64)
    strides = torch.tensor([t[0].numel() * t.element_size() for t in layers], dtype=torch.int64)
    sgl_kernel_cpu.copy_all_layer_kv_cache_cpu(ptrs, strides, tgt, src)
    for got, want in zip(layers, expected, strict=True):
        assert torch.equal(got, want)


def test_missing_kernel_names_itself() -> None:
    missing = sgl_kernel_cpu.MissingKernel("fused_sigmoid_mul_cpu", "no libcuda")
    with pytest.raises(sgl_kernel_cpu.MissingKernelError, match="fused_sigmoid_mul_cpu"):
        missing(torch.zeros(1))


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )


def _real_kernel_loads() -> bool:
    probe = _run("import sgl_kernel", SGLANG_KVALLOC_DISABLE_KERNEL_FALLBACK="1")
    return probe.returncode == 0


def test_bootstrap_provides_fallback_in_a_fresh_interpreter() -> None:
    """A new process (as upstream's spawned workers are) imports sgl_kernel via the .pth."""
    if _real_kernel_loads():
        pytest.skip("the real sgl_kernel loads here; the fallback is never used")
    code = (
        "import sgl_kernel\n"
        "from sgl_kernel import assign_req_to_token_pool_cpu, copy_all_layer_kv_cache_cpu\n"
        "print(sgl_kernel.SGLANG_KVALLOC_FALLBACK_REASON)\n"
        "import importlib\n"
        "try:\n"
        "    importlib.import_module('sgl_kernel.kvcacheio')\n"
        "except ModuleNotFoundError:\n"
        "    print('no-submodules')\n"
        "try:\n"
        "    sgl_kernel.some_cuda_only_op(1)\n"
        "except NotImplementedError as e:\n"
        "    print('missing:', e)\n"
    )
    result = _run(code, SGLANG_USE_CPU_ENGINE="1")
    assert result.returncode == 0, result.stderr
    assert "WARNING" in result.stderr or "pure-torch fallback kernels" in result.stderr
    assert "no-submodules" in result.stdout
    assert "missing: sgl_kernel.some_cuda_only_op is not available" in result.stdout


def test_fallback_can_be_disabled() -> None:
    if _real_kernel_loads():
        pytest.skip("the real sgl_kernel loads here")
    result = _run("import sgl_kernel", SGLANG_KVALLOC_DISABLE_KERNEL_FALLBACK="1")
    assert result.returncode != 0
    assert "ImportError" in result.stderr


def test_on_a_cuda_machine_a_broken_sgl_kernel_fails_as_upstream() -> None:
    """Not the CPU engine and a CUDA device torch can see: the import error stands."""
    if _real_kernel_loads():
        pytest.skip("the real sgl_kernel loads here")
    code = "import torch\ntorch.cuda.is_available = lambda: True\nimport sgl_kernel\n"
    result = _run(code, SGLANG_USE_CPU_ENGINE="0")
    assert result.returncode != 0
    assert "Error" in result.stderr.strip().splitlines()[-1]
    assert "fallback" not in result.stderr
