"""Every CUDA graph capture upstream performs is safe from the plugin's driver work (issue 31,
item 4): torch captures in its global mode, where another thread's unsafe driver calls
(the spare-handle refill thread's `cuMemCreate`) invalidate the capture.

- Captures upstream's runners make at start (decode, breakable and full prefill, speculative
  draft runners, row buckets) all run inside `parallel_state.graph_capture`, hooked: the
  refill thread waits for the whole capture.
- Graphs upstream captures lazily while serving (vision encoders, Nemotron-H's shared
  expert, torch.compile's piecewise graphs, the opt-in metadata glue) run at no time the
  plugin can know of: the refill thread creates its handles in the relaxed capture mode,
  which such a capture does not prohibit (its handles are never part of captured work).

The listing below is every capture site in upstream's source; a site not in it (a new
upstream version) fails until it is placed.
"""

from __future__ import annotations

import ast
import contextlib
import re
import threading
import types
from pathlib import Path

import pytest
from fake_cuda import MIB, FakeDriver, FakeVmmApi
from sglang.srt.mem_cache.segmented import attention_graph_buffers
from sglang.srt.mem_cache.segmented.cuda_backing import CudaBackingFactory, VmmDevice
from sglang.srt.mem_cache.segmented.runtime import RUNTIME

HOOKED = "inside parallel_state.graph_capture (hooked: the refill thread waits)"
LAZY = "captured while serving (the refill thread runs in the relaxed capture mode)"
NOT_CUDA = "not a CUDA device"
CAPTURE_SITES: dict[tuple[str, str], str] = {
    ("distributed/parallel_state.py", "graph_capture"): HOOKED,
    ("model_executor/runner/decode_cuda_graph_runner.py", "DecodeCudaGraphRunner._capture"): HOOKED,
    ("model_executor/runner/prefill_cuda_graph_runner.py", "PrefillCudaGraphRunner._capture"): HOOKED,  # noqa: E501
    ("model_executor/runner/row_bucket_graph_runner.py", "RowBucketGraphRunner._record"): HOOKED,
    # The runners' backends, called from the runners' captures above.
    ("model_executor/runner_backend/full_cuda_graph_backend.py", "FullCudaGraphBackend.capture_one"): HOOKED,  # noqa: E501
    ("model_executor/runner_backend/breakable_cuda_graph_backend.py", "BreakableCudaGraphBackend.capture_one"): HOOKED,  # noqa: E501
    ("model_executor/runner_backend_utils/breakable_cuda_graph/breakable_cuda_graph.py", "BreakableCUDAGraphCapture._begin_new_segment"): HOOKED,  # noqa: E501
    ("speculative/dspark_components/dspark_sampling_accept_graph.py", "DsparkSamplingAcceptGraph._capture"): HOOKED,  # noqa: E501
    # A graph built from captured ones (no capture of its own).
    ("model_executor/runner_backend/cuda_graph_dedup_mixin.py", "DedupedCudaGraphMixin.build_deduped_cuda_graph"): HOOKED,  # noqa: E501
    ("model_executor/runner/metadata_glue_graph.py", "MetadataGlueGraph.run"): LAZY,
    ("models/nemotron_h.py", "_capture_prefill_shared_expert"): LAZY,
    ("multimodal/vit_cuda_graph_runner.py", "ViTCudaGraphRunner._create_graph"): LAZY,
    ("multimodal/internvl_vit_cuda_graph_runner.py", "InternViTCudaGraphRunner._capture_graph"): LAZY,  # noqa: E501
    ("multimodal/kimi_k3_vit_cuda_graph_runner.py", "KimiK3ViTCudaGraphRunner._capture"): LAZY,
    ("compilation/cuda_piecewise_backend.py", "CUDAPiecewiseBackend.__call__"): LAZY,
    ("distributed/device_communicators/pymscclpp.py", "PyMscclppCommunicator._get_time"): LAZY,
    ("compilation/npu_piecewise_backend.py", "NPUPiecewiseBackend.__call__"): NOT_CUDA,
    ("compilation/xpu_piecewise_backend.py", "XPUPiecewiseBackend.__call__"): NOT_CUDA,
}  # fmt: skip
_CAPTURE_CALLS = {"graph_capture", "capture_begin", "CUDAGraph", "BreakableCUDAGraph"}
_CAPTURE_TEXT = re.compile(r"(graph_capture|capture_begin|CUDAGraph|\.graph)\s*\(")


def _capture_sites() -> set[tuple[str, str]]:
    """(file under sglang/srt, enclosing qualname) of every call that captures a CUDA graph
    or makes one: `graph_capture`, ``*.capture_begin``, ``*.graph(...)``, ``CUDAGraph()``."""
    import sglang

    root = Path(sglang.__file__).parent / "srt"
    sites: set[tuple[str, str]] = set()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("hardware_backend/") or "/test" in f"/{rel}":
            continue
        text = path.read_text()
        if not _CAPTURE_TEXT.search(text):  # no call below can be there (the scan is slow)
            continue
        stack: list[str] = []

        def visit(node: ast.AST, rel: str = rel, stack: list[str] = stack) -> None:
            named = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            if named:
                stack.append(node.name)
            if isinstance(node, ast.Call):
                func = node.func
                name = getattr(func, "attr", None) or getattr(func, "id", None)
                if name in _CAPTURE_CALLS or (name == "graph" and isinstance(func, ast.Attribute)):
                    sites.add((rel, ".".join(stack)))
            for child in ast.iter_child_nodes(node):
                visit(child)
            if named:
                stack.pop()

        visit(ast.parse(text))
    return sites


def test_every_upstream_capture_site_is_placed() -> None:
    found = _capture_sites()
    assert found - CAPTURE_SITES.keys() == set(), "capture sites not placed in CAPTURE_SITES"
    assert CAPTURE_SITES.keys() - found == set(), "CAPTURE_SITES lists sites upstream lacks"


def test_graph_capture_is_hooked() -> None:
    from sglang_kvalloc.upstream.plugin import hooks

    targets = {target: hook for target, hook, _ in hooks()}
    hook = targets["sglang.srt.distributed.parallel_state.graph_capture"]
    assert hook is attention_graph_buffers.around_graph_capture


def test_the_refill_thread_waits_for_a_whole_graph_capture(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    device = VmmDevice(FakeVmmApi(FakeDriver(capacity=64 * MIB)), 0, background_refill=False)
    monkeypatch.setattr(RUNTIME, "backings", CudaBackingFactory(device))
    events: list[str] = []

    @contextlib.contextmanager
    def upstreams_graph_capture(stream: object = None):  # noqa: ANN202
        events.append("capture begins")
        yield types.SimpleNamespace(stream=stream)
        events.append("capture ends")

    def refill() -> None:
        with device.refill_paused():  # what the refill thread holds while it creates
            events.append("refill")

    with attention_graph_buffers.around_graph_capture(
        upstreams_graph_capture, stream="s"
    ) as context:
        assert context.stream == "s"
        thread = threading.Thread(target=refill)
        thread.start()
        thread.join(timeout=0.5)
        assert thread.is_alive()  # waiting for the capture
        with device.refill_paused():  # the decode runner's own pause nests inside
            pass
    thread.join(timeout=5)
    assert events == ["capture begins", "capture ends", "refill"]


def test_without_a_cuda_backing_graph_capture_is_upstreams() -> None:
    sentinel = contextlib.nullcontext("upstream's")
    assert attention_graph_buffers.around_graph_capture(lambda: sentinel) is sentinel


def test_the_refill_thread_runs_in_the_relaxed_capture_mode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import cuda.bindings.driver as driver
    import torch
    from sglang.srt.mem_cache.segmented.cuda_vmm import UpstreamVmmApi

    calls: list[object] = []
    stub = types.SimpleNamespace(
        CUstreamCaptureMode=driver.CUstreamCaptureMode, CUresult=driver.CUresult,
        cuThreadExchangeStreamCaptureMode=lambda mode: calls.append(mode)
        or (driver.CUresult.CUDA_SUCCESS, driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL),
    )  # fmt: skip
    api = object.__new__(UpstreamVmmApi)
    api.driver, api.device_id = stub, 0
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(device))
    api.bind_thread()
    assert calls == [0, driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED]
