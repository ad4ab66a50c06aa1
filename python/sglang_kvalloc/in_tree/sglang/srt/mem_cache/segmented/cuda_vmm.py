"""The `VmmApi` of the CUDA backing on a real GPU: cuda-python's driver bindings and
upstream's helpers in `sglang.srt.utils.cuda_vmm_utils` (check_drv,
make_device_allocation_prop, get_allocation_granularity, make_rw_access_desc), which
0.5.23 ships for its own opt-in post-capture KV sizing. Upstream's `tensor_from_pointer`
makes a non-owning tensor; the backing needs its range kept until the last view is gone,
so tensors here come from a ``__cuda_array_interface__`` owner, which torch keeps alive
with the tensor.

The CPU tests run the backing over a fake driver instead; this module needs a GPU.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch

from sglang.srt.mem_cache.segmented.backing import BackingUnavailableError

logger = logging.getLogger(__name__)


class _ArrayOwner:
    """A ``__cuda_array_interface__`` over a device range that holds a reference to the
    range's owner; torch keeps this object alive as long as the tensor's storage."""

    def __init__(self, address: int, nbytes: int, owner: Any) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (address, False),
            "version": 3,
            "strides": None,
        }
        self.owner = owner


class UpstreamVmmApi:
    """cuda.bindings.driver plus upstream's VMM helpers, for one process's GPU."""

    def __init__(self, device_id: int) -> None:
        if torch.version.hip is not None:
            raise BackingUnavailableError(
                "--kv-alloc-mode segmented has no ROCm backing: the segmented GPU memory is "
                "built on the CUDA driver's virtual memory API"
            )
        try:
            from cuda.bindings import driver

            from sglang.srt.utils import cuda_vmm_utils
        except ImportError as exc:
            raise BackingUnavailableError(
                f"--kv-alloc-mode segmented needs cuda-python's driver bindings ({exc})"
            ) from None
        self.driver = driver
        self._utils = cuda_vmm_utils
        self.device_id = int(device_id)
        self._local = threading.local()
        self.syncs = 0  # device synchronizes the backing asked for (reported in stats)
        try:
            err, version = driver.cuDriverGetVersion()
        except (
            RuntimeError
        ) as exc:  # no libcuda: cuda.pathfinder's DynamicLibNotFoundError
            raise BackingUnavailableError(f"no CUDA driver: {exc}") from None
        if err != driver.CUresult.CUDA_SUCCESS or version < 11020:
            raise BackingUnavailableError(
                f"the CUDA driver ({version}) predates the virtual memory API in use (11.2)"
            )

    def check(self, result: Any, label: str) -> Any:
        return self._utils.check_drv(result, label)

    def allocation_prop(self, device_id: int) -> Any:
        # No exportable handle type: upstream's "auto" probes with real allocations and
        # exists for peer mapping, which KV segments do not use.
        return self._utils.make_device_allocation_prop(device_id, handle_types=None)

    def granularity(self, prop: Any, *, minimum: bool) -> int:
        flags = self.driver.CUmemAllocationGranularity_flags
        flag = (
            flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
            if minimum
            else flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED
        )
        return int(self._utils.get_allocation_granularity(prop, flag))

    def access_desc(self, device_id: int) -> Any:
        return self._utils.make_rw_access_desc(device_id)

    def tensor_over(
        self,
        address: int,
        nbytes: int,
        dtype: torch.dtype,
        shape: tuple[int, ...],
        owner: Any,
    ) -> torch.Tensor:
        device = torch.device("cuda", self.device_id)
        raw = torch.as_tensor(_ArrayOwner(address, nbytes, owner), device=device)
        return raw.view(dtype).view(shape)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device_id)
        self.syncs += 1

    def bind_thread(self) -> None:
        """The refill thread: the device current, and its capture mode relaxed. upstream
        captures some graphs lazily while serving in torch's global mode (vision
        encoders, Nemotron-H's shared expert, torch.compile's piecewise graphs), which
        prohibits other threads' handle creation; the refill thread's handles are never
        part of captured work (they are mapped later, on the scheduler's thread), so it
        may create them."""
        torch.cuda.set_device(self.device_id)
        relaxed = self.driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED
        result = self.driver.cuThreadExchangeStreamCaptureMode(relaxed)
        if result[0] != self.driver.CUresult.CUDA_SUCCESS:
            logger.warning(
                "KV VMM refill thread: cuThreadExchangeStreamCaptureMode failed (%s); a graph "
                "captured lazily while serving may be invalidated by its handle creation.",
                result[0],
            )

    def record_fence(self, streams: tuple[torch.cuda.Stream, ...] = ()) -> _EventFence:
        return _EventFence(streams)

    def reclaim(self) -> None:
        torch.cuda.empty_cache()


class _EventFence:
    """CUDA events on the current stream and on ``streams``: done when all have passed."""

    def __init__(self, streams: tuple[torch.cuda.Stream, ...]) -> None:
        self._events = []
        for stream in (torch.cuda.current_stream(), *streams):
            event = torch.cuda.Event()
            event.record(stream)
            self._events.append(event)

    def done(self) -> bool:
        if all(event.query() for event in self._events):
            self._events = []
            return True
        return False
