"""The GPU suite: skipped without CUDA. Every figure it measures is written to one JSON file
(``KVALLOC_GPU_RESULTS``, default ``gpu-results.json``) for docs/gpu.md.

Where upstream SGLang is not installed (the lent GPU machines), the modules it needs come from
``.gpu-upstream/`` (``python test/gpu/collect_upstream.py`` where it is installed; that folder
is git-ignored and travels with the working tree)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
HAS_CUDA = torch.cuda.is_available() and torch.version.hip is None

if HAS_CUDA:
    sys.path.insert(0, str(REPO / "python"))
    if importlib.util.find_spec("sglang") is None:
        sys.path.insert(0, os.environ.get("KVALLOC_GPU_UPSTREAM", str(REPO / ".gpu-upstream")))
    # The modules that would be upstream's (sglang.srt.mem_cache.segmented) are this
    # package's in_tree/ files: importing the package makes their upstream names resolve.
    import sglang_kvalloc  # noqa: F401


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="no CUDA device: the GPU suite runs on a lent GPU machine")
    for item in items:
        if "test/gpu/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


class Results:
    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value


@pytest.fixture(scope="session")
def results():
    record = Results()
    if HAS_CUDA:
        props = torch.cuda.get_device_properties(0)
        record["device"] = props.name
        record["total_memory_bytes"] = props.total_memory
        record["torch"] = torch.__version__
        record["cuda_runtime"] = torch.version.cuda
        record["started"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        try:
            from cuda.bindings import driver

            record["driver_version"] = int(driver.cuDriverGetVersion()[1])
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            record["driver_version"] = f"unknown ({exc})"
    yield record
    if HAS_CUDA:
        path = Path(os.environ.get("KVALLOC_GPU_RESULTS", "gpu-results.json"))
        path.write_text(json.dumps(record.data, indent=2, default=str) + "\n")


@pytest.fixture(scope="session")
def vmm():
    """The real driver through upstream's helpers, and the shared device state."""
    from sglang.srt.mem_cache.segmented.cuda_backing import VmmDevice
    from sglang.srt.mem_cache.segmented.cuda_vmm import UpstreamVmmApi

    torch.cuda.init()
    api = UpstreamVmmApi(0)
    device = VmmDevice(api, 0, background_refill=False)
    yield api, device
    device.close()
