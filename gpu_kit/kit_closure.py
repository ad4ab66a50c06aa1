"""Hide every distribution the GPU machine would not have, then import the kit's modules.

Run on the CPU, in this repository's venv (upstream, flashinfer and sglang-kernel installed):
a meta-path finder refuses any module whose file belongs to a distribution that is neither
on the GPU machine's list nor in the kit, and any file of upstream's package that the kit
prunes. ``sgl_kernel`` then resolves to the kit's stand-in. With ``--fake-cuda`` torch
reports one H100 (``is_available``, capability 9.0, properties), so the modules take their
CUDA import branches, as they will there.

    python gpu_kit/kit_closure.py [--fake-cuda] [--json OUT] [MODULE ...]

Servers inherit the hiding through ``hide/sitecustomize.py`` (``KIT_HIDE=1`` and that folder
on PYTHONPATH), so spawned schedulers are held to the same closure.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import json
import os
import sys
import sysconfig
import time
import traceback
import types
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kit_spec  # noqa: E402


def _owners() -> dict[str, str]:
    """Resolved file path -> normalized distribution name, for every installed file."""
    owners: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = kit_spec.normalize(dist.metadata["Name"] or "")
        for f in dist.files or []:
            owners[os.path.normpath(str(dist.locate_file(f)))] = name
    return owners


class HideFinder(importlib.abc.MetaPathFinder):
    """Stands in for sys.meta_path's PathFinder: finds what it finds, except modules from
    distributions outside ``allowed`` and upstream's pruned files, whose metadata it hides
    too (``importlib.metadata.version('flashinfer-python')`` raises, as on the GPU machine).
    A hidden module is simply not found, so probes (``importlib.util.find_spec``) see None."""

    def __init__(self, allowed: set[str]) -> None:
        self.allowed = allowed
        self.owners = _owners()
        self.stdlib = [os.path.normpath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib")]
        self.refused: dict[str, str] = {}

    def owner_of(self, origin: str) -> str | None:
        return self.owners.get(os.path.normpath(origin))

    def hidden_distribution(self, name: str) -> bool:
        return kit_spec.normalize(name) not in self.allowed

    def reason_to_hide(self, origin: str) -> str | None:
        origin = os.path.normpath(origin)
        site = "site-packages" in origin or "dist-packages" in origin
        if not site and any(origin.startswith(p + os.sep) for p in self.stdlib):
            return None
        dist = self.owner_of(origin)
        if dist is None:
            return "a file no installed distribution lists" if site else None
        if dist not in self.allowed:
            return f"distribution {dist} is neither on the GPU machine nor in the kit"
        if dist == "sglang":
            rel = origin.split(os.sep + "sglang" + os.sep, 1)[-1].replace(os.sep, "/")
            if kit_spec.is_pruned(rel):
                return f"sglang/{rel} is pruned from the kit"
        return None

    def find_spec(
        self, fullname: str, path: Any = None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or not spec.has_location or not spec.origin:
            return spec  # not found, or a namespace package (its modules are checked)
        reason = self.reason_to_hide(spec.origin)
        if reason is None:
            return spec
        self.refused.setdefault(fullname, reason)
        return None

    def invalidate_caches(self) -> None:
        importlib.machinery.PathFinder.invalidate_caches()

    def find_distributions(self, *args: Any, **kwargs: Any) -> Any:
        for dist in importlib.machinery.PathFinder.find_distributions(*args, **kwargs):
            if not self.hidden_distribution(dist.metadata["Name"] or ""):
                yield dist


def install_hiding() -> HideFinder:
    """Put the hiding finder in the PathFinder's place and the stand-in first on sys.path."""
    for existing in sys.meta_path:
        if type(existing).__name__ == "HideFinder":  # sitecustomize put one there already
            return existing  # type: ignore[return-value]
    allowed = kit_spec.gpu_machine_packages() | kit_spec.kit_distributions()
    stand_in = str(kit_spec.STAND_IN)
    if stand_in not in sys.path:
        sys.path.insert(0, stand_in)
    for name in [m for m in sys.modules if m == "sgl_kernel" or m.startswith("sgl_kernel.")]:
        del sys.modules[name]
    finder = HideFinder(allowed)
    sys.meta_path[:] = [finder if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
    importlib.invalidate_caches()
    return finder


class _FakeProps:
    name = "NVIDIA H100 80GB HBM3 (faked on the CPU)"
    major, minor = 9, 0
    total_memory = 85_520_809_984
    multi_processor_count = 132
    L2_cache_size = 50 * 1024 * 1024
    warp_size = 32


def fake_cuda() -> None:
    """Make torch report one H100 so upstream takes its CUDA import branches (imports only:
    nothing may launch on it)."""
    import torch

    torch.cuda.is_available = lambda: True  # type: ignore[assignment]
    torch.cuda.device_count = lambda: 1  # type: ignore[assignment]
    torch.cuda.current_device = lambda: 0  # type: ignore[assignment]
    torch.cuda.get_device_capability = lambda device=None: (9, 0)  # type: ignore[assignment]
    torch.cuda.get_device_properties = lambda device=None: _FakeProps()  # type: ignore
    torch.cuda.get_device_name = lambda device=None: _FakeProps.name  # type: ignore
    torch.cuda.is_bf16_supported = lambda *a, **k: True  # type: ignore[assignment]


def check_imports(modules: list[str]) -> dict[str, Any]:
    """Import each module; returns {module: {"ok", "seconds", "error"}}."""
    results: dict[str, Any] = {}
    for name in modules:
        started = time.perf_counter()
        try:
            importlib.import_module(name)
            results[name] = {"ok": True, "seconds": round(time.perf_counter() - started, 2)}
        except BaseException as exc:  # noqa: BLE001 - every failure is a finding
            tail = traceback.format_exception(type(exc), exc, exc.__traceback__)[-6:]
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "tb": tail}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", default=kit_spec.IMPORT_MODULES)
    parser.add_argument("--fake-cuda", action="store_true")
    parser.add_argument("--no-hide", action="store_true", help="import only (on the GPU)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    for key, value in kit_spec.SERVER_ENV.items():
        os.environ.setdefault(key, value)
    finder = None if args.no_hide else install_hiding()
    if args.fake_cuda:
        fake_cuda()
    # Upstream's benchmarks import HF datasets, which the GPU machine lacks: stubbed.
    datasets_stub = kit_spec.ensure_datasets_importable()
    results = check_imports(args.modules)
    try:
        import sgl_kernel
    except ImportError as exc:
        sgl_kernel = types.SimpleNamespace(__file__=f"not importable: {exc}")  # type: ignore

    report = {
        "imports": results,
        "ok": all(r["ok"] for r in results.values()),
        "refused": finder.refused if finder else {},
        "sgl_kernel": getattr(sgl_kernel, "__file__", None),
        "datasets_stub": datasets_stub,
        "sgl_kernel_submodules": sorted(m for m in sys.modules if m.startswith("sgl_kernel.")),
        "sgl_kernel_missing_ops_bound": stand_in_missing_ops(),
        "distributions_used": sorted(_used_distributions(finder)) if finder else [],
        "python": sys.version.split()[0],
    }
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    for name, r in results.items():
        print(f"{'ok ' if r['ok'] else 'FAIL'} {name} {r.get('error', '')}")
    if finder and finder.refused:
        print("refused:", json.dumps(finder.refused, indent=1))
    return 0 if report["ok"] else 1


def stand_in_missing_ops() -> list[str]:
    """The stand-in's MissingKernel names upstream bound so far (none if not the stand-in)."""
    names = list(getattr(sys.modules.get("sgl_kernel"), "KIT_MISSING_RESOLVED", []))
    helper = sys.modules.get("sgl_kernel._missing")
    names += getattr(helper, "RESOLVED", [])
    return sorted(set(names))


def _used_distributions(finder: HideFinder) -> set[str]:
    """The distributions whose files the imported modules came from."""
    used = set()
    for module in list(sys.modules.values()):
        origin = getattr(module, "__file__", None)
        if origin:
            dist = finder.owner_of(origin)
            if dist:
                used.add(dist)
    return used


if __name__ == "__main__":
    raise SystemExit(main())
