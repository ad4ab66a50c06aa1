"""What the GPU kit carries and how its servers run: one list shared by make_kit, the kit and
the CPU proof, so what is checked in CI is what travels.

The lent GPU machines have torch, triton, transformers and ~190 other distributions
(``gpu_machine_packages.txt``) but no SGLang and no network. The kit brings upstream's
package (pruned, ``PRUNED``), the wheels in ``KIT_WHEELS`` and a stand-in ``sgl_kernel``
(``stand_in/``); nothing else may be imported on the serving path.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
KIT_DIR = REPO / ".gpu-kit"
STAND_IN = HERE / "stand_in"
GPU_PACKAGES_FILE = HERE / "gpu_machine_packages.txt"

SGLANG_VERSION = "0.5.23"
GPU_PYTHON = "3.12"
# Tried in this order by pip download; the GPU machine's glibc is 2.39 (Ubuntu 24.04).
GPU_PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (34, 28, 27, 17)] + [
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]

# Distributions the GPU machine lacks that the launcher, HTTP server, Engine, scheduler,
# tokenizer/detokenizer managers, model runner, Llama, the triton backend, the decode graph
# runner and upstream's benchmarks import. Found by hiding everything else
# (test/unit/test_gpu_kit.py keeps it so). Versions: what this repository's venv runs.
KIT_WHEELS = [
    # imported on the serving path (hidden-import check), with what each declares it needs
    "annotated-types",
    "apache-tvm-ffi",
    "asttokens",
    "cffi",
    "compressed-tensors",
    "dill",
    "distro",
    "executing",
    "fastapi",
    "gguf",
    "ipython",
    "ipython-pygments-lexers",
    "jedi",
    "jiter",
    "jsonschema",
    "jsonschema-specifications",
    "loguru",
    "matplotlib-inline",
    "msgspec",
    "openai",
    "opentelemetry-api",
    "orjson",
    "parso",
    "partial-json-parser",
    "pexpect",
    "prompt-toolkit",
    "ptyprocess",
    "pure-eval",
    "pybase64",
    "pycparser",
    "pydantic",
    "pydantic-core",
    "python-multipart",
    "pyzmq",
    "referencing",
    "rpds-py",
    "setproctitle",
    "sniffio",
    "soundfile",
    "stack-data",
    "starlette",
    "traitlets",
    "typing-inspection",
    "uvicorn",
    "wcwidth",
    "xgrammar",
    # on the machine, but pydantic 2.14 needs >= 4.16
    "typing-extensions",
    # the build backend of this repository's package (installed editable, as setup.sh does)
    "hatchling",
    "editables",
    "tomlkit",
    "trove-classifiers",
]

# Files of upstream's package left out of the kit (paths inside the ``sglang`` package).
# The Rust extensions are built for torch 2.14; without ``rust_tree_core/mem_cache`` upstream
# takes its Python TreeCore by itself ("this installation contains neither ...").
PRUNED = [
    "multimodal_gen/*",
    "srt/rust_extensions/_*.so",
    "srt/mem_cache/rust_tree_core/mem_cache.*.so",
    "*/__pycache__/*",
    "__pycache__/*",
]

# Modules that must import on the GPU machine (the kit's first step imports them).
IMPORT_MODULES = [
    "sglang.launch_server",
    "sglang.srt.entrypoints.http_server",
    "sglang.srt.entrypoints.engine",
    "sglang.srt.managers.scheduler",
    "sglang.srt.managers.tokenizer_manager",
    "sglang.srt.managers.detokenizer_manager",
    "sglang.srt.model_executor.model_runner",
    "sglang.srt.models.llama",
    "sglang.srt.layers.attention.triton_backend",
    "sglang.srt.model_executor.runner.decode_cuda_graph_runner",
    "sglang.srt.layers.sampler",
    "sglang.srt.layers.logits_processor",
    "sglang.srt.model_loader.loader",
    "sglang.bench_serving",
    "sglang.benchmark.one_batch",
    "sglang_kvalloc.upstream.plugin",
    # upstream's default GPU path, probed first (kit_kernels.py)
    "sglang.srt.layers.attention.flashattention_backend",
    "sglang.kernels.ops.attention.flash_attention",
    "sglang.kernels.ops.attention.rope",
    "sglang.srt.layers.layernorm",
    "sglang.srt.layers.activation",
    "sglang.srt.model_executor.runner.prefill_cuda_graph_runner",
    "sglang.srt.model_executor.runner_backend.breakable_cuda_graph_backend",
    "sglang.srt.model_executor.runner_backend_utils.weak_ref_tensor",
    "sgl_kernel.quantization",
    "sgl_kernel.kvcacheio",
    "sgl_kernel.utils",
]

# Environment of every kit server (and of the import check).
SERVER_ENV = {
    # apache-tvm-ffi would compile a torch add-on at import.
    "TVM_FFI_DISABLE_TORCH_C_DLPACK": "1",
    # The Rust TreeCore is pruned; say so rather than rely on the fallback's probe.
    "SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND": "python",
    # No sglang-kernel distribution is installed: upstream's start-up version check would stop.
    "SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK": "1",
    # One JIT cache for every kit process (upstream compiles its store_cache kernel once).
    "SGLANG_JIT_CACHE_DIR": "/tmp/sglang-kvalloc-kit-jit",
    "PYTHONUNBUFFERED": "1",
}
# The path the kit proved before it probed upstream's default one (``kit_kernels.py``), kept
# for a run whose probe did not run: triton attention, decode graphs on, prefill graphs off,
# every fused op in pure torch (kernels/fused_op.py), no grammar backend.
GPU_PROVEN_ENV = {"SGLANG_FORCE_FUSED_OP_BACKEND": "torch"}
GPU_PROVEN_ARGS = [
    "--attention-backend",
    "triton",
    "--sampling-backend",
    "pytorch",
    "--grammar-backend",
    "none",
    "--cuda-graph-backend-prefill",
    "disabled",
    "--cuda-graph-max-bs-decode",
    "32",
]
# Tried in order when a server does not start with its flags alone; the kit keeps the
# first set that starts and says so (decode graphs off is a finding, not a pass).
GPU_FALLBACK_ARGS: list[list[str]] = [[], ["--cuda-graph-backend-decode", "disabled"]]


def normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one dash."""
    return re.sub(r"[-_.]+", "-", name).lower()


def gpu_machine_packages() -> set[str]:
    """The normalized names in gpu_machine_packages.txt."""
    names = set()
    for line in GPU_PACKAGES_FILE.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(normalize(line))
    return names


def kit_distributions() -> set[str]:
    """What the kit installs: the wheels, upstream's package and this repository's."""
    return {normalize(n) for n in KIT_WHEELS} | {
        "sglang",
        "sglang-kvalloc",
        "sglang-kvalloc-harness",
    }


def is_pruned(rel: str) -> bool:
    """Whether ``rel`` (a path inside the ``sglang`` package, '/'-separated) stays behind."""
    return any(fnmatch.fnmatch(rel, pattern) for pattern in PRUNED)


def ensure_datasets_importable() -> str | None:
    """Upstream's benchmark package imports HF ``datasets`` (its MMMU loader) at import time;
    the GPU machine has none and random-ids never loads a dataset. Where it does not import,
    a stub whose ``load_dataset`` raises takes its place. Returns why, or None."""
    import sys
    import types

    if "datasets" in sys.modules:
        return getattr(sys.modules["datasets"], "KIT_STUB_REASON", None)
    try:
        import datasets  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure: the stub
        reason = f"{type(exc).__name__}: {exc}"
        stub = types.ModuleType("datasets")

        def load_dataset(*args: object, **kwargs: object) -> None:
            raise RuntimeError(f"the GPU kit has no HF datasets ({reason})")

        stub.load_dataset = load_dataset  # type: ignore[attr-defined]
        stub.KIT_STUB_REASON = reason  # type: ignore[attr-defined]
        sys.modules["datasets"] = stub
        return reason
    return None
