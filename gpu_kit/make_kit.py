"""Build the GPU kit into ``.gpu-kit/`` (git-ignored) from this venv and the package index.

    python gpu_kit/make_kit.py [--out .gpu-kit]

What it holds, for a GPU machine with Python 3.12, torch and no network:

- ``wheels/``: the cp312 / manylinux x86_64 (or pure-Python) wheels of ``kit_spec.KIT_WHEELS``,
  at the versions this venv runs;
- ``sglang-0.5.23-pruned.tar.xz``: upstream's package from its cp312 wheel, less
  ``kit_spec.PRUNED`` (the Rust extensions, ``multimodal_gen``), with its dist-info;
- ``manifest.json``: names, versions, files, hashes and sizes, and a digest of kit_spec's
  lists so the kit can tell it is stale.

This repository's package is not in the kit: it travels as the working tree and ``kit.sh``
installs it editable there. Run it in the repository's venv (``scripts/setup.sh``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kit_spec  # noqa: E402

MiB = 1 << 20
LIMIT_MIB = 40  # the working tree plus the kit (the device tool carries 64 MiB in all)
CACHE = Path.home() / ".cache" / "sglang-kvalloc" / "kit-downloads"


def spec_digest() -> str:
    """What the kit was built from: changes when kit_spec's lists change."""
    text = json.dumps([sorted(kit_spec.KIT_WHEELS), kit_spec.PRUNED, kit_spec.SGLANG_VERSION])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pip_download(requirements: list[str], dest: Path) -> None:
    """cp312 manylinux x86_64 (or pure) wheels, no dependencies, no source builds."""
    platforms = [arg for p in kit_spec.GPU_PLATFORMS for arg in ("--platform", p)]
    cmd = [
        sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
        "--python-version", kit_spec.GPU_PYTHON, "--implementation", "cp", *platforms,
        "-d", str(dest), *requirements,
    ]  # fmt: skip
    subprocess.run(cmd, check=True)


def wheel_versions() -> dict[str, str]:
    """KIT_WHEELS pinned to the versions installed here (what CI imports)."""
    out = {}
    for name in kit_spec.KIT_WHEELS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit(
                f"{name} is not installed in this venv: run scripts/setup.sh"
            ) from None
    return out


def download_wheels(out: Path) -> list[dict[str, Any]]:
    versions = wheel_versions()
    tmp = Path(tempfile.mkdtemp(prefix="kit-wheels-"))
    try:
        pip_download([f"{n}=={v}" for n, v in versions.items()], tmp)
        wheels = sorted(tmp.glob("*.whl"))
        by_name = {kit_spec.normalize(w.name.split("-")[0]): w for w in wheels}
        missing = {kit_spec.normalize(n) for n in versions} - set(by_name)
        if missing or len(wheels) != len(versions):
            raise SystemExit(f"pip download gave {len(wheels)} wheels; missing {missing}")
        dest = out / "wheels"
        dest.mkdir(parents=True)
        rows = []
        for name, version in sorted(versions.items()):
            wheel = by_name[kit_spec.normalize(name)]
            shutil.move(str(wheel), dest / wheel.name)
            rows.append(
                {
                    "name": name,
                    "version": version,
                    "file": wheel.name,
                    "bytes": (dest / wheel.name).stat().st_size,
                    "sha256": sha256(dest / wheel.name),
                }
            )
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sglang_wheel() -> Path:
    """Upstream's cp312 wheel, cached between runs."""
    CACHE.mkdir(parents=True, exist_ok=True)
    found = sorted(CACHE.glob(f"sglang-{kit_spec.SGLANG_VERSION}-cp312-*.whl"))
    if not found:
        pip_download([f"sglang=={kit_spec.SGLANG_VERSION}"], CACHE)
        found = sorted(CACHE.glob(f"sglang-{kit_spec.SGLANG_VERSION}-cp312-*.whl"))
    if not found:
        raise SystemExit("no cp312 wheel of sglang on the index")
    return found[-1]


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, int(mtime)
    tar.addfile(info, io.BytesIO(data))


def prune_sglang(wheel: Path, target: Path) -> dict[str, Any]:
    """Write upstream's package less the pruned files, with its dist-info, as .tar.xz."""
    dist_info = f"sglang-{kit_spec.SGLANG_VERSION}.dist-info/"
    kept: list[str] = []
    pruned = kept_bytes = pruned_bytes = 0
    with zipfile.ZipFile(wheel) as zf, tarfile.open(target, "w:xz", preset=6) as tar:
        record = zf.read(dist_info + "RECORD").decode().splitlines()
        for member in zf.infolist():
            name = member.filename
            if member.is_dir() or name == dist_info + "RECORD":
                continue
            if name.startswith("sglang/") and kit_spec.is_pruned(name[len("sglang/") :]):
                pruned += 1
                pruned_bytes += member.file_size
                continue
            data = zf.read(member)
            mtime = time.mktime(member.date_time + (0, 0, -1))
            _add(tar, name, data, 0o755 if name.endswith(".so") else 0o644, mtime)
            kept.append(name)
            kept_bytes += len(data)
        keep = set(kept)
        lines = [line for line in record if line.split(",")[0] in keep]
        lines += [f"{dist_info}{n},," for n in ("INSTALLER", "PRUNED", "RECORD")]
        notes = {
            "INSTALLER": "sglang-kvalloc-gpu-kit\n",
            "PRUNED": "pruned by sglang-kvalloc's GPU kit: " + ", ".join(kit_spec.PRUNED) + "\n",
            "RECORD": "\n".join(lines) + "\n",
        }
        for rel, text in notes.items():
            _add(tar, dist_info + rel, text.encode(), 0o644, time.time())
    if dist_info + "METADATA" not in keep:
        raise SystemExit(f"{wheel.name} has no {dist_info}METADATA")
    return {
        "wheel": wheel.name,
        "wheel_sha256": sha256(wheel),
        "file": target.name,
        "bytes": target.stat().st_size,
        "files_kept": len(kept),
        "files_pruned": pruned,
        "bytes_kept_uncompressed": kept_bytes,
        "bytes_pruned_uncompressed": pruned_bytes,
    }


def tree_bytes(repo: Path) -> int:
    """Tracked and untracked-not-ignored files: what the device tool sends besides carry."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "-co", "--exclude-standard"],
        cwd=repo,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    total = 0
    for name in names:
        path = repo / name.decode()
        if name and path.is_file():
            total += path.stat().st_size
    return total


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def build(out: Path) -> dict[str, Any]:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    started = time.monotonic()
    manifest: dict[str, Any] = {
        "made_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "spec_digest": spec_digest(),
        "target": {"python": kit_spec.GPU_PYTHON, "platforms": kit_spec.GPU_PLATFORMS},
        "wheels": download_wheels(out),
        "sglang": prune_sglang(
            sglang_wheel(), out / f"sglang-{kit_spec.SGLANG_VERSION}-pruned.tar.xz"
        ),
    }
    kit = folder_bytes(out)
    tree = tree_bytes(kit_spec.REPO)
    manifest["sizes"] = {
        "kit_bytes": kit,
        "wheels_bytes": sum(w["bytes"] for w in manifest["wheels"]),
        "working_tree_bytes": tree,
        "tree_plus_kit_mib": round((kit + tree) / MiB, 2),
        "limit_mib": LIMIT_MIB,
    }
    manifest["build_seconds"] = round(time.monotonic() - started, 1)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=kit_spec.KIT_DIR)
    args = parser.parse_args(argv)
    manifest = build(args.out)
    sizes = manifest["sizes"]
    print(
        f"[make_kit] {args.out}: {len(manifest['wheels'])} wheels "
        f"({sizes['wheels_bytes'] / MiB:.1f} MiB), {manifest['sglang']['file']} "
        f"({manifest['sglang']['bytes'] / MiB:.1f} MiB; {manifest['sglang']['files_pruned']} "
        f"files pruned); kit {sizes['kit_bytes'] / MiB:.1f} MiB, working tree "
        f"{sizes['working_tree_bytes'] / MiB:.1f} MiB, together {sizes['tree_plus_kit_mib']} MiB "
        f"(limit {LIMIT_MIB}); {manifest['build_seconds']} s"
    )
    if sizes["tree_plus_kit_mib"] > LIMIT_MIB:
        print(f"[make_kit] over {LIMIT_MIB} MiB: the device tool would refuse or crowd it")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
