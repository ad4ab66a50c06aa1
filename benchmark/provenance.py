"""Where a benchmark figure comes from: the commit, the command and the machine, recorded in
each benchmark's JSON (`record`), and how far the measured code is from today's
(`staleness`), which `summary.py` prints beside every figure."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# What a benchmark measures: the plugin's code (and the benchmark itself).
MEASURED = ("python/sglang_kvalloc", "benchmark")


def git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_state() -> dict[str, Any]:
    return {"head": git("rev-parse", "HEAD"), "status": git("status", "--short").splitlines()}


def machine_info() -> dict[str, Any]:
    """The machine a run measured: CPU, memory, GPU (if any), kernel and library versions."""
    import psutil
    import torch

    try:
        import sglang

        sglang_version = getattr(sglang, "__version__", "unknown")
    except ImportError:
        sglang_version = "not installed"
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        overcommit = Path("/proc/sys/vm/overcommit_memory").read_text().strip()
    except OSError:
        overcommit = None
    gpu = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"none (torch.cuda.is_available() == {torch.cuda.is_available()})"
    )
    return {
        "cpu_model": cpu,
        "logical_cpus": os.cpu_count(),
        "memory_total_bytes": psutil.virtual_memory().total,
        "memory_available_at_start_bytes": psutil.virtual_memory().available,
        "swap_total_bytes": psutil.swap_memory().total,
        "gpu": gpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sglang": sglang_version,
        "vm_overcommit_memory": overcommit,
    }


def record(script: str, argv: list[str] | None = None) -> dict[str, Any]:
    """The provenance block of a benchmark's JSON: commit, command, machine, start time."""
    args = sys.argv[1:] if argv is None else argv
    return {
        "git": git_state(),
        "command": " ".join(["python", script, *args]),
        "machine": machine_info(),
        "recorded_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def measured_commit(data: dict[str, Any], json_path: Path) -> tuple[str, str]:
    """The commit a JSON's figures were measured on, and how that is known: recorded in the
    JSON (`provenance.git.head`, or bench_kv_alloc's older `git.head`), else the commit that
    added the JSON file (the code measured is at most that new)."""
    block = data.get("provenance", {}).get("git") or data.get("git") or {}
    head = block.get("head")
    if head:
        dirty = " (with uncommitted changes)" if block.get("status") else ""
        return head, f"recorded{dirty}"
    rel = json_path.resolve().relative_to(REPO) if json_path.is_absolute() else json_path
    # The last commit that changed its content (moves of the file do not count).
    added = git("log", "--follow", "--diff-filter=AM", "-1", "--format=%H", "--", str(rel))
    return added, "not recorded: the commit that wrote the JSON"


def staleness(data: dict[str, Any], json_path: Path) -> str:
    """One line for a figure's source: its commit, and how many commits have touched the
    measured code since (0: the figure is of the current code)."""
    commit, how = measured_commit(data, json_path)
    if not commit:
        return "commit unknown"
    since = git("rev-list", "--count", f"{commit}..HEAD", "--", *MEASURED)
    count = int(since) if since.isdigit() else -1
    where = (
        "current code" if count == 0 else f"{count} commits have touched the measured code since"
    )
    return f"commit {commit[:10]} ({how}); {where}"
