"""The GPU kit's driver (``kit.sh`` runs it): install the kit into this Python, check the
imports, probe upstream's default-path kernels (the servers run that path minus what did not
run: ``kit_kernels.py``), build the model, then real servers (static, segmented, the benchmark
between them, auto at 10M, two servers on one budget, a PD decode server). Every phase writes
``results.json`` in the output folder as it ends, so a timeout still returns what ran;
servers' logs sit beside it (at most 8 files).

    python3 gpu_kit/kit_run.py OUT [--profile gpu|cpu] [--phases a,b] [--deadline-s N]

``--profile cpu`` is the CPU proof: the same phases on the CPU engine with the tiny model,
under the GPU machine's import closure (``KIT_HIDE=1``), no install.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kit_spec  # noqa: E402
from kit_work import Checks, Workload  # noqa: E402

PHASES = ["install", "imports", "jit", "kernels", "model", "static", "segmented", "rl",
          "bench", "stop", "auto", "budget", "pd"]  # fmt: skip
# Seconds a phase needs at least; it is skipped when less is left before the deadline.
NEEDS = {"install": 30, "imports": 20, "jit": 60, "kernels": 45, "model": 40, "static": 90,
         "segmented": 90, "rl": 20, "bench": 45, "stop": 5, "auto": 90,
         "budget": 120, "pd": 90}  # fmt: skip
AUTO_RESERVE_S = 100  # what the bench leaves for auto
BUDGET_RESERVE_S = 130  # and for the budget phase
GPU_POOL_ARGS = ["--context-length", "65536", "--max-total-tokens", "262144",
                 "--mem-fraction-static", "0.45"]  # fmt: skip
HIDE_DIR = kit_spec.HERE / "hide"


def profiles(name: str) -> Any:
    """The GPU run, or its CPU proof (small enough for CI's two cores)."""
    from kit_phases import Profile

    if name == "gpu":
        return Profile(
            name="gpu",
            device="cuda",
            common_args=[*kit_spec.GPU_PROVEN_ARGS, *GPU_POOL_ARGS],
            server_env=dict(kit_spec.GPU_PROVEN_ENV),
            fallback_args=kit_spec.GPU_FALLBACK_ARGS,
            segment_tokens=4096,
            idle_cache_tokens=8192,
            hold_off_s=2.0,
            auto_args=[*kit_spec.GPU_PROVEN_ARGS],
            work=Workload(vocab=0, sequential=[17, 1000, 9000, 40000], new_tokens=48,
                          prefix_extra=200, burst=[3000 + 160 * i for i in range(32)],
                          burst_new_tokens=64, abort_prompt=20000, abort_new_tokens=4000,
                          abort_after_s=1.0),
            start_timeout=240,
            idle_timeout=30,
            bench_loads={"decode": {"input_len": 128, "output_len": 256, "prompts": 32},
                         "prefill": {"input_len": 4096, "output_len": 1, "prompts": 32}},
            bench_rounds=8,
            pause_others=False,
        )  # fmt: skip
    return Profile(
        name="cpu",
        device="cpu",
        common_args=["--dtype", "float32", "--context-length", "8192",
                     "--max-total-tokens", "16384"],
        fallback_args=[[]],
        segment_tokens=512,
        idle_cache_tokens=512,
        hold_off_s=1.0,
        auto_args=["--dtype", "float32", "--max-total-tokens", "16384"],
        work=Workload(vocab=0, sequential=[17, 300, 2500], new_tokens=6, prefix_extra=50,
                      burst=[200, 400, 600, 800], burst_new_tokens=8, abort_prompt=200,
                      abort_new_tokens=3000, abort_after_s=1.5),
        start_timeout=150,  # about 30 s here; CI's one hang (its cause unseen) sat 300 s
        idle_timeout=30,
        bench_loads={"decode": {"input_len": 16, "output_len": 8, "prompts": 4}},
        bench_rounds=2,
        pause_others=True,
        bench_warmup=False,
        hung_start_retries=1,
    )  # fmt: skip


class Kit:
    """Results, the deadline and the phase bookkeeping."""

    def __init__(self, out: Path, profile: str, deadline_s: float, phases: list[str]) -> None:
        self.out, self.profile_name, self.phases = out, profile, phases
        self.started = time.monotonic()
        self.deadline = self.started + deadline_s
        self.checks = Checks()
        self.results: dict[str, Any] = {
            "kit": {
                "profile": profile,
                "phases_asked": phases,
                "deadline_s": deadline_s,
                "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "host": platform.node(),
                "python": sys.version.split()[0],
                "executable": sys.executable,
                "repo_commit": _git_head(),
            },
            "phases": {},
            "checks": self.checks.items,
        }

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        self.results["kit"]["elapsed_s"] = round(time.monotonic() - self.started, 1)
        self.results["ok"] = self.checks.ok and all(
            p.get("status") in ("ok", "skipped") for p in self.results["phases"].values()
        )
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1, default=str) + "\n")
        tmp.replace(self.out / "results.json")

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[dict[str, Any] | None]:
        """Runs the block unless not asked or out of time; records status and seconds."""
        record: dict[str, Any] = {}
        if name not in self.phases:
            yield None
            return
        if self.remaining() < NEEDS[name]:
            self.results["phases"][name] = {"status": "skipped", "why": "time"}
            self.save()
            log(f"{name}: skipped ({self.remaining():.0f} s left)")
            yield None
            return
        log(f"{name}: start ({self.remaining():.0f} s left)")
        started = time.monotonic()
        self.results["phases"][name] = record
        try:
            yield record
            record.setdefault("status", "ok")
        except Exception as exc:  # noqa: BLE001 - recorded; later phases decide for themselves
            record["status"] = "failed"
            record["error"] = f"{type(exc).__name__}: {exc}"[-16000:]
            record["traceback"] = traceback.format_exc()[-6000:]
            log(f"{name}: FAILED {record['error']}")
        finally:
            record["seconds"] = round(time.monotonic() - started, 1)
            self.save()
            log(f"{name}: {record.get('status')} in {record['seconds']} s")

    def ok(self, name: str) -> bool:
        return self.results["phases"].get(name, {}).get("status") == "ok"


def log(msg: str) -> None:
    print(f"[kit {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _git_head() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=kit_spec.REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return None


def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
    """Run a command; its output, or an error carrying the output's tail."""
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])}... exit {proc.returncode}:\n{proc.stdout[-3000:]}"
                           f"\n{proc.stderr[-3000:]}")  # fmt: skip
    return proc.stdout


def install(kit_dir: Path, record: dict[str, Any]) -> None:
    """The kit's wheels, upstream's pruned package, the stand-in and this package (editable)
    into this Python. Only the standard library is used here."""
    import importlib.util

    from make_kit import spec_digest

    manifest = json.loads((kit_dir / "manifest.json").read_text())
    record["manifest_made_utc"] = manifest.get("made_utc")
    record["kit_is_current"] = manifest.get("spec_digest") == spec_digest()
    py = sys.executable
    wheels = sorted(str(w) for w in (kit_dir / "wheels").glob("*.whl"))
    t0 = time.monotonic()
    run([py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
         "--disable-pip-version-check", *wheels], timeout=240)  # fmt: skip
    record["wheels"] = len(wheels)
    record["wheels_seconds"] = round(time.monotonic() - t0, 1)
    purelib = Path(sysconfig.get_paths()["purelib"])
    with tarfile.open(kit_dir / manifest["sglang"]["file"]) as tar:
        tar.extractall(purelib, filter="data")
    record["sglang_into"] = str(purelib)
    spec = importlib.util.find_spec("sgl_kernel")
    ours = spec is not None and spec.origin and (Path(spec.origin).parent / "_missing.py").exists()
    if spec is None or ours:  # absent, or an earlier copy of this stand-in (a rehearsal)
        shutil.rmtree(purelib / "sgl_kernel", ignore_errors=True)
        shutil.copytree(kit_spec.STAND_IN / "sgl_kernel", purelib / "sgl_kernel")
        record["sgl_kernel"] = "stand-in installed"
    else:
        record["sgl_kernel"] = f"a real sgl_kernel is importable here ({spec.origin}): kept"
    packages = [kit_spec.REPO / "python", kit_spec.REPO / "harness"]  # product, harness
    editable = [arg for package in packages for arg in ("-e", str(package))]
    run([py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", *editable], timeout=240)  # fmt: skip
    record["seconds_total"] = round(time.monotonic() - t0, 1)
    # This process started before the editable install: its .pth is not read here.
    for package in packages:
        if str(package) not in sys.path:
            sys.path.append(str(package))


VERSIONS = """
import importlib.metadata as m, json, sys
names = ["torch", "triton", "transformers", "tokenizers", "safetensors", "numpy", "sglang",
         "sglang-kvalloc", "sglang-kvalloc-harness", "typing-extensions", "pydantic",
         "cuda-bindings", "xgrammar"]
out = {}
for n in names:
    try:
        out[n] = m.version(n)
    except m.PackageNotFoundError:
        out[n] = None
import torch
out["cuda_available"] = torch.cuda.is_available()
if out["cuda_available"]:
    out["device"] = torch.cuda.get_device_name(0)
    out["capability"] = list(torch.cuda.get_device_capability(0))
    out["torch_cuda"] = torch.version.cuda
print(json.dumps(out))
"""


def imports_phase(kit: Kit, record: dict[str, Any], hide: bool) -> None:
    env = dict(kit_spec.SERVER_ENV)
    if hide:
        env.update(_hide_env())
    record["versions"] = json.loads(run([sys.executable, "-c", VERSIONS], 120, env))
    report = kit.out / "imports.json.tmp"
    cmd = [sys.executable, str(kit_spec.HERE / "kit_closure.py"), "--json", str(report)]
    # On the GPU the machine is the truth; on the CPU everything it lacks is hidden and torch
    # reports an H100, so upstream's CUDA import branches run (imports only).
    cmd += ["--fake-cuda"] if hide else ["--no-hide"]
    if not hide and os.environ.get("KIT_FAKE_CUDA") == "1":  # a rehearsal without a GPU
        cmd.append("--fake-cuda")
    error = None
    try:
        run(cmd, 300, env)
    except RuntimeError as exc:  # exit 1 when a module fails: the report says which
        error = str(exc)[-3000:]
    finally:
        if report.exists():
            record["report"] = json.loads(report.read_text())
            report.unlink()
    if "report" not in record:
        raise RuntimeError(f"the import check wrote no report: {error}")
    results = record["report"]["imports"]
    bench = [m for m in results if m.startswith(("sglang.bench", "sglang.benchmark"))]
    core_ok = all(r["ok"] for m, r in results.items() if m not in bench)
    kit.checks.add("imports: the kit's modules import", core_ok)
    bench_ok = all(results[m]["ok"] for m in bench)
    kit.checks.add("imports: upstream's benchmarks import", bench_ok, strict=False)
    if not core_ok:
        raise RuntimeError("a module the servers need does not import: see report")
    if not bench_ok and "bench" in kit.phases:
        kit.phases.remove("bench")
        record["bench_dropped"] = "upstream's benchmark modules do not import here"


JIT_PREWARM = """
import json, time
t = time.time()
from sglang.kernels.ops.kvcache.kvcache import can_use_store_cache
ok = can_use_store_cache(%d, %d)
print(json.dumps({"store_cache_jit": ok, "seconds": round(time.time() - t, 1)}))
"""


def kernels_phase(kit: Kit, record: dict[str, Any], profile: Any) -> None:
    """Probe upstream's default-path kernels on the GPU; the servers run that path minus what
    did not run (`kit_kernels.default_path`, each substitute named with its error)."""
    import kit_kernels

    env = {key: value for key, value in kit_spec.SERVER_ENV.items()}
    output = run([sys.executable, str(kit_spec.HERE / "kit_kernels.py")], 240, env)
    report = json.loads(output.strip().splitlines()[-1])
    record["probes"] = report
    chosen = kit_kernels.default_path(report)
    pythonpath = os.environ.get("PYTHONPATH")
    if "PYTHONPATH" in chosen.env and pythonpath:
        chosen.env["PYTHONPATH"] += os.pathsep + pythonpath
    profile.common_args = [*chosen.args, *GPU_POOL_ARGS]
    profile.auto_args = list(chosen.args)
    profile.server_env = chosen.env
    record["default_path"] = chosen.path
    kit.results["kit"]["default_path"] = chosen.path
    kit.checks.add("kernels: fa3 runs (upstream's default attention)", report["fa3"]["ok"],
                   strict=False)  # fmt: skip
    kit.checks.add("kernels: the JIT rope kernel runs", report["rope_jit"]["ok"], strict=False)


def _hide_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {"KIT_HIDE": "1", "PYTHONPATH": str(HIDE_DIR) + (os.pathsep + path if path else "")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--profile", choices=["gpu", "cpu"], default="gpu")
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--deadline-s", type=float, default=450.0)
    parser.add_argument("--kit-dir", type=Path, default=kit_spec.KIT_DIR)
    parser.add_argument("--model", type=Path, help="CPU proof: an existing tiny model")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    phases = [p for p in args.phases.split(",") if p]
    kit = Kit(args.out, args.profile, args.deadline_s, phases)
    gpu = args.profile == "gpu"
    for key, value in kit_spec.SERVER_ENV.items():
        os.environ.setdefault(key, value)
    if not gpu:
        # This process, the servers and every helper under the GPU machine's closure.
        import kit_closure

        kit_closure.install_hiding()
        os.environ.update(_hide_env())
    signal.signal(signal.SIGTERM, _interrupted)  # kit.sh's timeout: stop servers, keep results
    try:
        return _main(kit, args, phases, gpu)
    finally:
        kit.save()


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}: the kit's time is up")


def _main(kit: Kit, args: argparse.Namespace, phases: list[str], gpu: bool) -> int:
    kit.save()
    with kit.phase("install") as rec:
        if rec is not None:
            if gpu:
                install(args.kit_dir, rec)
            else:
                rec["status"] = "skipped"
                rec["why"] = "CPU proof: this venv is the installation (closure hidden)"
    with kit.phase("imports") as rec:
        if rec is not None:
            imports_phase(kit, rec, hide=not gpu)
    if "imports" in phases and not kit.ok("imports"):
        log("imports failed: stopping here")
        return 1
    from kit_phases import Stage
    from kit_server import Memory

    profile = profiles(args.profile)
    memory = Memory(profile.device)
    with kit.phase("jit") as rec:
        if rec is not None:
            if gpu:
                code = JIT_PREWARM % (2048, 2048)
                rec.update(json.loads(run([sys.executable, "-c", code], 120).splitlines()[-1]))
            else:
                rec["status"] = "skipped"
    with kit.phase("kernels") as rec:
        if rec is not None:
            if gpu:
                kernels_phase(kit, rec, profile)
            else:
                rec["status"] = "skipped"
                rec["why"] = "CPU proof: upstream's CUDA kernels do not run here (imports: yes)"
    if not set(phases) & {"model", "static", "segmented", "bench", "stop", "auto", "budget", "pd"}:
        return 0 if kit.checks.ok else 1
    model = args.model
    with kit.phase("model") as rec:
        if rec is not None:
            rec.update(_build_model(args, gpu))
            model = Path(rec["path"])
    if model is None:
        log("no model: stopping here")
        return 1
    _fill_profile(profile, model)
    stage = Stage(profile, model, args.out, memory, kit.checks)
    kit.results["baseline_memory"] = memory.reading()
    try:
        _server_phases(kit, stage)
    finally:
        for server in list(stage.servers.values()):
            server.stop()
        kit.results["kit"]["extra_args_used"] = stage.extra_args
    log(f"done: ok={kit.results['ok']} in {time.monotonic() - kit.started:.0f} s")
    return 0 if kit.results["ok"] else 1


def _build_model(args: argparse.Namespace, gpu: bool) -> dict[str, Any]:
    if gpu:
        import kit_model

        return kit_model.build(Path("/tmp/sglang-kvalloc-kit-model"), device="cuda")
    if args.model is not None:
        return {"path": str(args.model), "built": False}
    from sglang_kvalloc_harness.tiny_model import ensure

    return {"path": str(ensure(args.out.parent / "kit-tiny-llama")), "built": True}


def _fill_profile(profile: Any, model: Path) -> None:
    """Vocabulary and KV bytes per token from the model's config."""
    cfg = json.loads((model / "config.json").read_text())
    profile.work.vocab = cfg["vocab_size"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    elem = 4 if dtype == "float32" else 2
    kv_heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    profile.kv_bytes_per_token = 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * elem


def _server_phases(kit: Kit, stage: Any) -> None:
    import kit_phases

    def timeout() -> float:
        return max(30.0, min(stage.profile.start_timeout, kit.remaining() - 20))

    if "bench" in kit.phases:  # upstream's benchmark imports while the first server starts
        import threading

        import kit_bench

        threading.Thread(target=kit_bench.prefetch, daemon=True).start()

    with kit.phase("static") as rec:
        if rec is not None:
            rec.update(kit_phases.static_phase(stage, timeout()))
            stage.baseline["static"] = rec
    with kit.phase("segmented") as rec:
        if rec is not None:
            rec.update(kit_phases.segmented_phase(stage, timeout()))
    with kit.phase("rl") as rec:
        if rec is not None:
            if "segmented" in stage.servers:
                rec.update(kit_phases.rl_phase(stage))
            else:
                rec.update(status="skipped", why="the segmented server is not up")
    with kit.phase("bench") as rec:
        if rec is not None:
            if {"static", "segmented"} <= set(stage.servers):
                reserve = 10 + AUTO_RESERVE_S * ("auto" in kit.phases)
                reserve += BUDGET_RESERVE_S * ("budget" in kit.phases)
                rec.update(kit_phases.bench_phase(stage, kit.remaining() - reserve))
            else:
                rec.update(status="skipped", why="static and segmented are not both up")
    if kit.results["phases"].get("bench", {}).get("status") == "failed":
        kit.results["phases"]["bench"]["partial"] = stage.baseline.get("bench_partial")
    with kit.phase("stop") as rec:
        if rec is not None:
            rec.update(kit_phases.stop_phase(stage))
    with kit.phase("auto") as rec:
        if rec is not None:
            rec.update(kit_phases.auto_phase(stage, timeout()))
    with kit.phase("budget") as rec:
        if rec is not None:
            import kit_budget

            rec.update(kit_budget.budget_phase(stage, timeout()))
    with kit.phase("pd") as rec:
        if rec is not None:
            import kit_pd

            rec.update(kit_pd.pd_phase(stage, timeout()))


if __name__ == "__main__":
    raise SystemExit(main())
