"""The GPU kit's CPU proof (issue 25): the kit cannot rot between the times a GPU is lent.

One run of the kit's own driver (``gpu_kit/kit_run.py --profile cpu``) on the tiny model:
its import check hides every distribution the GPU machine lacks and is not in the kit (their
metadata too) and makes torch report an H100, so upstream's CUDA import branches run against
the stand-in ``sgl_kernel``; then a static and a segmented server on the CPU engine, held to
the same closure in every process, get the kit's workload (many segments, prefix hits, a
burst, an abort), the idle release is checked, and upstream's ``bench_serving`` runs two tiny
rounds between them. Nothing is downloaded; ``.gpu-kit/`` is not needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
GPU_DIR = REPO / "gpu_kit"
sys.path.append(str(GPU_DIR))  # after test/ (its conftest.py must not be shadowed)

import kit_spec  # noqa: E402

PHASES = "install,imports,static,segmented,rl,bench,stop,budget,pd"


@pytest.fixture(scope="module")
def kit_results(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("kit-out")
    cmd = [sys.executable, str(GPU_DIR / "kit_run.py"), str(out), "--profile", "cpu",
           "--phases", PHASES, "--model", str(tiny_model), "--deadline-s", "1500"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    results_file = out / "results.json"
    assert results_file.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(results_file.read_text())
    results["_files"] = sorted(p.name for p in out.iterdir())
    results["_returncode"] = proc.returncode
    results["_tail"] = (proc.stdout + proc.stderr)[-4000:]
    return results


def _failed_checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in results["checks"] if c["strict"] and not c["ok"]]


def test_imports_under_the_gpu_machines_closure(kit_results: dict[str, Any]) -> None:
    imports = kit_results["phases"]["imports"]
    assert imports["status"] == "ok", imports
    report = imports["report"]
    failed = {m: r for m, r in report["imports"].items() if not r["ok"]}
    assert not failed, failed
    assert set(report["imports"]) == set(kit_spec.IMPORT_MODULES)
    # The stand-in, not the venv's sglang-kernel, and its CUDA-side submodules.
    assert report["sgl_kernel"].startswith(str(kit_spec.STAND_IN))
    assert {"sgl_kernel.quantization", "sgl_kernel.kvcacheio", "sgl_kernel.utils"} <= set(
        report["sgl_kernel_submodules"]
    )
    # With torch reporting an H100, upstream bound sgl_kernel's CUDA ops at import.
    assert "rmsnorm" in report["sgl_kernel_missing_ops_bound"]
    # What the venv has and the GPU machine lacks was hidden, not silently used.
    assert "flashinfer" in report["refused"] or "flashinfer.jit" in report["refused"]


def test_kit_wheels_are_what_the_imports_need(kit_results: dict[str, Any]) -> None:
    """Every distribution the imports used is on the GPU machine or in the kit, and every
    kit wheel's declared needs are too (so no lazy import finds one missing)."""
    from importlib.metadata import distribution

    from packaging.requirements import Requirement

    used = set(kit_results["phases"]["imports"]["report"]["distributions_used"])
    gpu, kit = kit_spec.gpu_machine_packages(), kit_spec.kit_distributions()
    assert used <= gpu | kit, used - gpu - kit
    marker_env = {"python_version": kit_spec.GPU_PYTHON, "sys_platform": "linux",
                  "platform_machine": "x86_64", "platform_system": "Linux", "extra": "",
                  "os_name": "posix", "implementation_name": "cpython",
                  "platform_python_implementation": "CPython"}  # fmt: skip
    missing = {}
    for name in kit_spec.KIT_WHEELS:
        for text in distribution(name).requires or []:
            req = Requirement(text)
            if req.marker and not req.marker.evaluate(marker_env):
                continue
            dep = kit_spec.normalize(req.name)
            if dep not in gpu | kit:
                missing[name] = dep
    assert not missing, missing
    # And nothing the imports used from outside the GPU machine is missing from the kit.
    assert (used - gpu) <= kit


def _phase_failure(name: str, phase: dict[str, Any], tail: str) -> str:
    """A failed phase as lines a reader can follow (a dict's repr folds them into one)."""
    return f"{name}: {phase.get('status')}\n{phase.get('error')}\n-- the kit's output:\n{tail}"


def test_servers_pass_the_kits_checks(kit_results: dict[str, Any]) -> None:
    phases = kit_results["phases"]
    for name in ("static", "segmented", "bench", "stop", "budget", "pd"):
        phase = phases[name]
        assert phase["status"] == "ok", _phase_failure(name, phase, kit_results["_tail"])
    for name in ("static", "segmented"):
        for failed in phases[name]["failed_tries"]:  # a hang tried again: say where it stood
            assert failed["hung"], failed["error"]
            warnings.warn(
                f"the kit's {name} server hung at start once:\n{failed['error']}", stacklevel=1
            )
    assert not _failed_checks(kit_results), _failed_checks(kit_results)
    names = {c["name"] for c in kit_results["checks"]}
    for expected in (
        "segmented: sequential tokens equal static's",
        "segmented: committed at start is what the log says",
        "segmented: committed memory given back when idle",
        "segmented: requests spanned many segments",
        "static: abort ends the request early",
        "budget: the first gave way",
        "budget: the ledger never held more than its total",
        "pd: segmented decode at 10M commits its KV on demand",
        "pd: segments committed as requests needed them, none inside an allocation",
        "pd: idle, every segment but the first given back",
    ):
        assert expected in names
    assert kit_results["ok"] is True and kit_results["_returncode"] == 0


def test_bench_gives_ratios_with_intervals(kit_results: dict[str, Any]) -> None:
    bench = kit_results["phases"]["bench"]
    assert len(bench["rounds"]) == 2
    figure = bench["summary"]["decode.output_throughput"]
    assert figure["rounds"] == 2 and figure["ratio_ci95"] is not None


def test_output_folder_fits_what_comes_back(kit_results: dict[str, Any]) -> None:
    """The device tool returns at most 8 files; the kit writes results.json and one log per
    server (kit.sh adds kit.log)."""
    files = kit_results["_files"]
    assert "results.json" in files and len(files) + 1 <= 8, files


def test_pruning_and_stand_in_rules() -> None:
    assert kit_spec.is_pruned("multimodal_gen/runtime/x.py")
    assert kit_spec.is_pruned("srt/rust_extensions/_server.cpython-312-x86_64-linux-gnu.so")
    assert kit_spec.is_pruned(
        "srt/mem_cache/rust_tree_core/mem_cache.cpython-312-x86_64-linux-gnu.so"
    )
    assert not kit_spec.is_pruned("srt/managers/scheduler.py")
    assert not kit_spec.is_pruned("srt/rust_extensions/loader.py")
    code = (
        "import sgl_kernel, sgl_kernel.utils, sgl_kernel.quantization as q\n"
        "from sglang_kvalloc_harness.kernels.sgl_kernel_cpu import MissingKernelError\n"
        "assert sgl_kernel.SGLANG_KVALLOC_STAND_IN\n"
        "assert sgl_kernel.utils.is_arch_support_pdl() is False  # no CUDA device here\n"
        "assert callable(sgl_kernel.assign_req_to_token_pool_cpu)\n"
        "try:\n    q.ggml_dequantize()\nexcept MissingKernelError as e:\n"
        "    assert 'quantization.ggml_dequantize' in str(e)\nelse:\n    raise SystemExit(1)\n"
        "try:\n    import sgl_kernel.flash_attn\nexcept ModuleNotFoundError:\n    pass\n"
        "else:\n    raise SystemExit('flash_attn should be missing')\n"
        "import torch\nx = torch.ones(3)\n"
        "assert sgl_kernel.weak_ref_tensor(x).data_ptr() == x.data_ptr()  # prefill graphs\n"
    )
    env = {**os.environ, "PYTHONPATH": str(kit_spec.STAND_IN)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_default_path_is_upstreams_minus_what_did_not_run() -> None:
    """Issue 31, item 5: the kit's servers run upstream's default GPU path where its probe ran
    (fa3, JIT rope, breakable prefill graphs, CUDA fused ops), a named substitute where not."""
    import kit_kernels

    ran = {name: {"ok": True} for name in kit_kernels.PROBES}
    upstream = kit_kernels.default_path(ran)
    assert upstream.args == kit_kernels.GPU_BASE_ARGS and upstream.env == {}
    assert "--attention-backend" not in upstream.args  # fa3: upstream's own choice on Hopper
    missing = "MissingKernel: sgl_kernel.fwd (sglang-kvalloc GPU kit stand-in: ...)"
    stand_in = {
        **ran,
        "fa3": {"ok": False, "error": missing},
        "rmsnorm": {"ok": False, "error": "MissingKernel: sgl_kernel.rmsnorm"},
        "silu_and_mul": {"ok": False, "error": "MissingKernel: sgl_kernel.silu_and_mul"},
    }
    chosen = kit_kernels.default_path(stand_in)
    assert chosen.args[-2:] == ["--attention-backend", "triton"]
    assert "--cuda-graph-backend-prefill" not in chosen.args  # weak_ref_tensor ran
    assert chosen.path["attention"] == f"triton: fa3 did not run ({missing})"
    assert chosen.env["KIT_NATIVE_OPS"] == "RMSNorm,SiluAndMul"  # rope stays on its JIT kernel
    code = (
        "from sglang.srt.layers.layernorm import RMSNorm\n"
        "from sglang.srt.layers.activation import SiluAndMul\n"
        "from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding as R\n"
        "assert RMSNorm.forward_cuda is RMSNorm.forward_native\n"
        "assert SiluAndMul.forward_cuda is SiluAndMul.forward_native\n"
        "assert R.forward_cuda is not R.forward_native\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, **chosen.env},
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_manifest_matches_the_spec_where_a_kit_was_made() -> None:
    manifest_file = kit_spec.KIT_DIR / "manifest.json"
    if not manifest_file.exists():
        pytest.skip("no .gpu-kit/ here (make it with python gpu_kit/make_kit.py)")
    from importlib.metadata import version

    from make_kit import spec_digest

    manifest = json.loads(manifest_file.read_text())
    assert manifest["spec_digest"] == spec_digest(), "kit_spec changed: rerun make_kit"
    wheels = {kit_spec.normalize(w["name"]): w["version"] for w in manifest["wheels"]}
    assert wheels == {kit_spec.normalize(n): version(n) for n in kit_spec.KIT_WHEELS}
    assert manifest["sizes"]["tree_plus_kit_mib"] <= 40


def test_model_builder_writes_a_gqa_llama_with_head_dim_128(tmp_path: Path) -> None:
    """The GPU model's builder, at a small size on the CPU: config, weights, tokenizer."""
    import kit_model

    small = {"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 512,
             "num_attention_heads": 2, "num_key_value_heads": 1}  # fmt: skip
    built = kit_model.build(tmp_path / "m", device="cpu", dtype="bfloat16", shape=small)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["head_dim"] == 128 and config["dtype"] == "bfloat16"
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    assert (tmp_path / "m" / "tokenizer.json").exists() and built["weights_bytes"] > 0
    assert built["kv_bytes_per_token"] == 2 * 2 * 1 * 128 * 2
    full = kit_model.SHAPE
    assert full["head_dim"] == 128 and full["num_key_value_heads"] < full["num_attention_heads"]
    assert kit_model.kv_bytes_per_token() == 64 * 1024


def test_a_hung_start_is_tried_again_and_an_exit_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kit's launch: a start that hangs (its stacks in the failure) gets one more try on
    the CPU profile; a server that exits at start fails the phase at once."""
    import kit_phases
    import kit_run
    from kit_server import Memory
    from kit_work import Checks

    outcomes: list[Exception | None] = []

    class StandInServer:
        def __init__(self, name: str, *args: Any, **kwargs: Any) -> None:
            self.name, self.args = name, ["--x"]

        def start(self, timeout: float) -> float:
            outcome = outcomes.pop(0)
            if outcome is not None:
                raise outcome
            return 1.0

        def stop(self) -> None:
            pass

        def pids(self) -> list[int]:
            return []

        def kv(self) -> dict[str, Any]:
            return {"mode": "static"}

    monkeypatch.setattr(kit_phases, "KitServer", StandInServer)
    profile = kit_run.profiles("cpu")
    assert profile.hung_start_retries == 1
    stage = kit_phases.Stage(profile, tmp_path, tmp_path, Memory("cpu"), Checks())

    outcomes[:] = [TimeoutError("hung\nFatal Python error: Aborted"), None]
    server, record = kit_phases.launch(stage, "static", [], {}, timeout=5)
    assert isinstance(server, StandInServer) and not outcomes
    assert [f["hung"] for f in record["failed_tries"]] == [True]
    assert "Fatal Python error" in record["failed_tries"][0]["error"]

    outcomes[:] = [TimeoutError("hung"), TimeoutError("hung again"), None]
    with pytest.raises(RuntimeError, match="hung again"):
        kit_phases.launch(stage, "segmented", [], {}, timeout=5)
    assert outcomes == [None]  # two hangs end it: one retry only

    outcomes[:] = [RuntimeError("server exited with 1 at start"), None]
    with pytest.raises(RuntimeError, match="exited with 1"):
        kit_phases.launch(stage, "segmented", [], {}, timeout=5)
    assert outcomes == [None]  # an exit is not tried again
