"""Which kernels of upstream's default GPU path run on the lent machine, and the server flags
that follow (the kit's ``kernels`` phase).

A default Llama server on Hopper runs fa3 attention, the JIT rope kernel, breakable prefill
graphs, the overlap scheduler and CUDA fused ops (RMSNorm, fused add-RMSNorm, SiluAndMul).
The kit carries no sglang-kernel CUDA build (its 1.1 GB ``flash_ops`` cannot travel), so each
piece is tried on tiny tensors first, and the servers run the default path minus what did not
run, each substitute named with the error that caused it:

    python3 gpu_kit/kit_kernels.py        # prints the probe report (JSON), on a GPU

`default_path` turns a report into flags and environment; it is pure, so CI tests it.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Upstream's fused-op classes a Llama server calls, the probe that runs each one's CUDA path,
# and their modules; a class whose probe fails is pinned to its torch path in the servers
# (``native_ops/sitecustomize.py``).
NATIVE_OP_CLASSES = {
    "RMSNorm": "sglang.srt.layers.layernorm",
    "SiluAndMul": "sglang.srt.layers.activation",
    "RotaryEmbedding": "sglang.srt.layers.rotary_embedding.base",
}
OP_PROBES = {"rmsnorm": "RMSNorm", "fused_add_rmsnorm": "RMSNorm", "silu_and_mul": "SiluAndMul",
             "rope_jit": "RotaryEmbedding"}  # fmt: skip
NATIVE_OPS_ENV = "KIT_NATIVE_OPS"
NATIVE_OPS_DIR = Path(__file__).resolve().parent / "native_ops"
# What every kit server on a GPU needs whatever the probes say: flashinfer's sampling and the
# grammar backends are not carried; decode graphs up to batch 32 (the hooked runner).
GPU_BASE_ARGS = ["--sampling-backend", "pytorch", "--grammar-backend", "none",
                 "--cuda-graph-max-bs-decode", "32"]  # fmt: skip


@dataclass
class DefaultPath:
    """The servers' flags and environment for the default path, and what was substituted."""

    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    path: dict[str, str] = field(default_factory=dict)


def _why(report: dict[str, Any], probe: str) -> str | None:
    """None when the probe ran, else its error's first line."""
    result = report.get(probe) or {"ok": False, "error": "not probed"}
    if result.get("ok"):
        return None
    return str(result.get("error", "failed")).strip().splitlines()[0][:300]


def default_path(report: dict[str, Any]) -> DefaultPath:
    """Upstream's default path where its probe ran, the nearest substitute where it did not."""
    out = DefaultPath(args=list(GPU_BASE_ARGS))
    why = _why(report, "fa3")
    if why is None:
        out.path["attention"] = "fa3 (upstream's default on Hopper)"
    else:
        out.args += ["--attention-backend", "triton"]
        out.path["attention"] = f"triton: fa3 did not run ({why})"
    why = _why(report, "weak_ref_tensor")
    if why is None:
        out.path["prefill_graphs"] = "breakable (upstream's default)"
    else:
        out.args += ["--cuda-graph-backend-prefill", "disabled"]
        out.path["prefill_graphs"] = f"disabled: sgl_kernel.weak_ref_tensor did not run ({why})"
    native: list[str] = []
    for probe, cls in OP_PROBES.items():
        why = _why(report, probe)
        out.path[probe] = "CUDA path" if why is None else f"torch path: {why}"
        if why is not None and cls not in native:
            native.append(cls)
    if native:
        out.env[NATIVE_OPS_ENV] = ",".join(native)
        out.env["PYTHONPATH"] = str(NATIVE_OPS_DIR)
    out.path["overlap_scheduler"] = "on (upstream's default)"
    return out


# -- the probes (on the GPU) -------------------------------------------------------------------


def _fa3() -> None:
    import torch
    from sglang.kernels.ops.attention.flash_attention import flash_attn_with_kvcache

    q = torch.randn(1, 1, 8, 128, device="cuda", dtype=torch.bfloat16)
    cache = torch.randn(4, 1, 8, 128, device="cuda", dtype=torch.bfloat16)
    page_table = torch.arange(4, device="cuda", dtype=torch.int32).view(1, 4)
    lens = torch.tensor([4], device="cuda", dtype=torch.int32)
    flash_attn_with_kvcache(q, cache, cache, page_table=page_table, cache_seqlens=lens,
                            max_seqlen_q=1, softmax_scale=128**-0.5, causal=True)  # fmt: skip
    torch.cuda.synchronize()


def _rope_jit() -> None:
    import torch
    from sglang.kernels.ops.attention.rope import apply_rope_with_cos_sin_cache_inplace

    cache = torch.randn(64, 128, device="cuda", dtype=torch.float32)  # float32, as upstream's
    q = torch.randn(4, 8, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(4, 8, 128, device="cuda", dtype=torch.bfloat16)
    positions = torch.arange(4, device="cuda", dtype=torch.int64)
    apply_rope_with_cos_sin_cache_inplace(positions=positions, q=q, k=k, cos_sin_cache=cache,
                                          is_neox=True)  # fmt: skip
    torch.cuda.synchronize()


def _rmsnorm(residual: bool) -> Callable[[], None]:
    def run() -> None:
        import torch
        from sglang.srt.layers.layernorm import RMSNorm

        norm = RMSNorm(256).to(device="cuda", dtype=torch.bfloat16)
        x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
        if residual:
            norm.forward_cuda(x, torch.randn_like(x))
        else:
            norm.forward_cuda(x)
        torch.cuda.synchronize()

    return run


def _silu_and_mul() -> None:
    import torch
    from sglang.srt.layers.activation import SiluAndMul

    SiluAndMul().forward_cuda(torch.randn(4, 512, device="cuda", dtype=torch.bfloat16))
    torch.cuda.synchronize()


def _weak_ref_tensor() -> None:
    import torch
    from sgl_kernel import weak_ref_tensor

    x = torch.randn(4, device="cuda")
    if weak_ref_tensor(x).data_ptr() != x.data_ptr():
        raise RuntimeError("weak_ref_tensor returned another storage")


PROBES: dict[str, Callable[[], None]] = {
    "fa3": _fa3,
    "rope_jit": _rope_jit,
    "rmsnorm": _rmsnorm(residual=False),
    "fused_add_rmsnorm": _rmsnorm(residual=True),
    "silu_and_mul": _silu_and_mul,
    "weak_ref_tensor": _weak_ref_tensor,
}


def probe() -> dict[str, dict[str, Any]]:
    """Run every probe; each one's outcome and, where it failed, the error's tail."""
    import time

    report: dict[str, dict[str, Any]] = {}
    for name, run in PROBES.items():
        started = time.monotonic()
        try:
            run()
            report[name] = {"ok": True}
        except Exception as exc:  # noqa: BLE001 - recorded: the server takes a substitute
            report[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[-2000:],
                            "traceback": traceback.format_exc()[-2000:]}  # fmt: skip
        report[name]["seconds"] = round(time.monotonic() - started, 2)
    return report


if __name__ == "__main__":
    print(json.dumps(probe()))
