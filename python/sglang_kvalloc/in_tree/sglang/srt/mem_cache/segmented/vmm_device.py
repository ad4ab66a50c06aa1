"""The CUDA device under the VMM backing: its allocation properties and granularity, the
zero-filled scratch handle every uncommitted granule maps to, and a pool of pre-created
physical handles refilled off the serving path (``cuMemCreate`` is the slow driver
call).

The driver calls go through a `VmmApi`: cuda-python's ``cuda.bindings.driver`` with
upstream's helpers in the server (`sglang.srt.mem_cache.segmented.cuda_vmm`), a fake
with the driver's rules over host memory in CI. This module imports neither.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any, Protocol

import torch

from sglang.srt.mem_cache.segmented.backing import BackingUnavailableError, Fence

__all__ = ["VmmApi", "VmmDevice", "VmmMappingLostError", "driver_success"]

logger = logging.getLogger(__name__)


class VmmMappingLostError(RuntimeError):
    """Part of a reservation is left without any mapping (a device access there would
    kill the CUDA context): the process cannot go on serving safely."""


class VmmApi(Protocol):
    """The CUDA driver subset the backing uses, and the helpers around it."""

    driver: Any
    """``cuda.bindings.driver`` (or a fake): every call returns ``(CUresult, *outputs)``."""

    def check(self, result: Any, label: str) -> Any:
        """Raise on an error result; return the first output (or None)."""
        ...

    def allocation_prop(self, device_id: int) -> Any:
        """A pinned, device-local ``CUmemAllocationProp`` (no exportable handle type)."""
        ...

    def granularity(self, prop: Any, *, minimum: bool) -> int:
        """``cuMemGetAllocationGranularity`` with the MINIMUM or the RECOMMENDED flag."""
        ...

    def access_desc(self, device_id: int) -> Any:
        """A read-write ``CUmemAccessDesc`` for the device."""
        ...

    def tensor_over(
        self,
        address: int,
        nbytes: int,
        dtype: torch.dtype,
        shape: tuple[int, ...],
        owner: Any,
    ) -> torch.Tensor:
        """A tensor over ``[address, address + nbytes)`` that keeps ``owner`` alive for
        as long as it or any view of it lives."""
        ...

    def synchronize(self) -> None:
        """Wait until no kernel is in flight on the device."""
        ...

    def bind_thread(self) -> None:
        """Make the device current on the calling thread (for the refill thread)."""
        ...

    def record_fence(self, streams: tuple[Any, ...] = ()) -> Fence:
        """A fence behind the work queued so far on the current stream and on ``streams``."""
        ...

    def reclaim(self) -> None:
        """Give cached-but-free device memory back to the driver (torch's caching
        allocator), before a failed allocation is taken as final."""
        ...


# Large reservations map their scratch in chunks of this many granules: one mapping per chunk
# instead of one per granule (an 8M context on 8x H200 reserves about 105K granules a rank); a
# commit first breaks the chunk it touches into granule mappings.
SCRATCH_CHUNK_GRANULES = 4
# Reservations of fewer chunks than this keep one mapping per granule.
CHUNKED_RESERVATION_MIN_CHUNKS = 16


def driver_success(drv: Any) -> Any:
    """The driver's CUDA_SUCCESS."""
    return drv.CUresult.CUDA_SUCCESS


class VmmDevice:
    """Per-device state shared by every backing on it: the allocation properties, the
    granularity, the zero-filled scratch handle, and the pool of spare handles."""

    _instances: dict[tuple[int, int], VmmDevice] = {}
    _lock = threading.Lock()

    def __init__(
        self, api: VmmApi, device_id: int, *, background_refill: bool = True
    ) -> None:
        self.api = api
        self.device_id = int(device_id)
        drv = api.driver
        self._check_supported()
        self.prop = api.allocation_prop(self.device_id)
        self.min_granularity = api.granularity(self.prop, minimum=True)
        # Upstream's choice: the RECOMMENDED granularity (a multiple of the minimum).
        self.granularity = api.granularity(self.prop, minimum=False)
        if self.granularity % self.min_granularity:
            raise BackingUnavailableError(
                f"CUDA device {self.device_id}: recommended granularity {self.granularity} is "
                f"not a multiple of the minimum {self.min_granularity}"
            )
        self.access = [api.access_desc(self.device_id)]
        self._oom = drv.CUresult.CUDA_ERROR_OUT_OF_MEMORY
        self._spares: dict[int, list[Any]] = {}
        self._spare_target: dict[int, int] = {}
        self._spare_lock = threading.Lock()
        self.handles_created = 0
        self.handles_released = 0
        self.spare_hits = 0
        self.spare_misses = 0
        self.reclaims = 0
        # Held by the refill thread while it creates a handle, and by `refill_paused` for a
        # whole CUDA graph capture: no other thread's driver work runs during a capture.
        # Reentrant: a capture inside `graph_capture` inside the decode runner's capture.
        self._refill_gate = threading.RLock()
        self._refill_wanted = threading.Event()
        self._closed = False
        self.scratch = self._create_handle(self.granularity)
        self._zero(self.scratch, self.granularity)
        self.scratch_chunk_bytes = self.granularity * SCRATCH_CHUNK_GRANULES
        self._scratch_chunk: Any = None
        self._scratch_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        if background_refill:
            self._thread = threading.Thread(
                target=self._refill_loop, name="kv-vmm-refill", daemon=True
            )
            self._thread.start()

    @classmethod
    def get(cls, api: VmmApi, device_id: int, **kwargs: Any) -> VmmDevice:
        """The shared instance for (api, device)."""
        key = (id(api), int(device_id))
        with cls._lock:
            device = cls._instances.get(key)
            if device is None or device._closed:
                device = cls(api, device_id, **kwargs)
                cls._instances[key] = device
            return device

    # -- support --------------------------------------------------------------------------

    def _check_supported(self) -> None:
        drv = self.api.driver
        attributes = drv.CUdevice_attribute
        attribute = attributes.CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
        err, supported = drv.cuDeviceGetAttribute(attribute, self.device_id)[:2]
        if err != drv.CUresult.CUDA_SUCCESS:
            raise BackingUnavailableError(
                f"CUDA device {self.device_id}: cannot query virtual memory support ({err})"
            )
        if not supported:
            raise BackingUnavailableError(
                f"CUDA device {self.device_id} does not support virtual memory management "
                "(CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED is 0)"
            )

    # -- handles --------------------------------------------------------------------------

    def _create_handle(self, nbytes: int) -> Any:
        drv = self.api.driver
        result = drv.cuMemCreate(nbytes, self.prop, 0)
        if result[0] == self._oom:
            raise MemoryError(f"cuMemCreate of {nbytes} bytes: out of device memory")
        handle = self.api.check(result, "cuMemCreate")
        self.handles_created += 1
        return handle

    def _release_handle(self, handle: Any) -> None:
        self.api.check(self.api.driver.cuMemRelease(handle), "cuMemRelease")
        self.handles_released += 1

    def take_handle(self, nbytes: int) -> Any:
        """A physical handle of ``nbytes``: a pre-created one if there is one (then the
        pool is refilled off this path), else created now (MemoryError when the device
        is full)."""
        with self._spare_lock:
            spares = self._spares.get(nbytes)
            handle = spares.pop() if spares else None
        if handle is not None:
            self.spare_hits += 1
        else:
            self.spare_misses += 1
            try:
                handle = self._create_handle(nbytes)
            except MemoryError:
                self._reclaim()
                handle = self._create_handle(nbytes)
        self._refill_wanted.set()
        return handle

    def _reclaim(self) -> None:
        """Free memory torch's cache holds may be what is missing: give it back (once
        per failed allocation; the caller's next failure is final)."""
        self.api.reclaim()
        self.reclaims += 1

    def give_back(self, handle: Any, nbytes: int) -> None:
        """A handle no longer mapped: kept as a spare up to the target, else released."""
        with self._spare_lock:
            spares = self._spares.setdefault(nbytes, [])
            if len(spares) < self._spare_target.get(nbytes, 0):
                spares.append(handle)
                return
        self._release_handle(handle)

    def keep_spares(self, nbytes: int, count: int) -> None:
        """Keep ``count`` pre-created handles of ``nbytes`` (the next commit's worth)."""
        with self._spare_lock:
            self._spare_target[nbytes] = max(self._spare_target.get(nbytes, 0), count)
        self._refill_wanted.set()

    def ready_handles(self, nbytes: int, count: int) -> int:
        """Create spare handles of ``nbytes`` on this thread until ``count`` are held
        (or the device is full, after one reclaim); returns how many are held. They
        serve the next commits; what is left over goes at the next `trim_spares`."""
        with self._spare_lock:
            held = len(self._spares.get(nbytes, []))
        reclaimed = False
        while held < count:
            try:
                handle = self._create_handle(nbytes)
            except MemoryError:
                if reclaimed:
                    break
                self._reclaim()
                reclaimed = True
                continue
            with self._spare_lock:
                self._spares.setdefault(nbytes, []).append(handle)
            held += 1
        return held

    def trim_spares(self) -> int:
        """Release every spare handle (at idle, so the memory really goes back)."""
        with self._spare_lock:
            spares = [h for handles in self._spares.values() for h in handles]
            self._spares = {}
            self._spare_target = {}
        for handle in spares:
            self._release_handle(handle)
        return len(spares)

    @property
    def spare_bytes(self) -> int:
        with self._spare_lock:
            return sum(size * len(handles) for size, handles in self._spares.items())

    def refill(self) -> None:
        """Create spare handles up to their targets (the refill thread's work)."""
        while not self._closed:
            with self._spare_lock:
                need = [
                    size
                    for size, target in self._spare_target.items()
                    if len(self._spares.get(size, [])) < target
                ]
            if not need:
                return
            size = need[0]
            try:
                handle = self._create_handle(size)
            except MemoryError:
                return  # the device is full: commits will say so when they need memory
            with self._spare_lock:
                spares = self._spares.setdefault(size, [])
                if len(spares) < self._spare_target.get(size, 0):
                    spares.append(handle)
                    handle = None
            if handle is not None:
                self._release_handle(handle)

    def _refill_loop(self) -> None:
        self.api.bind_thread()
        while not self._closed:
            self._refill_wanted.wait()
            self._refill_wanted.clear()
            if self._closed:
                return
            try:
                with self._refill_gate:
                    self.refill()
            except Exception:  # noqa: BLE001 - a failed refill must not stop serving
                logger.exception("KV VMM spare-handle refill failed")

    @contextlib.contextmanager
    def refill_paused(self) -> Iterator[None]:
        """While active the refill thread creates no handle (it waits): torch captures
        CUDA graphs in the global capture mode, where another thread's driver calls can
        invalidate the capture. Waits for a creation in progress to end first."""
        with self._refill_gate:
            yield

    # -- scratch --------------------------------------------------------------------------

    def scratch_chunk(self) -> Any:
        """The zero-filled scratch handle of `scratch_chunk_bytes` that large
        reservations map chunk by chunk (made on first use)."""
        with self._scratch_lock:
            if self._scratch_chunk is None:
                handle = self._create_handle(self.scratch_chunk_bytes)
                self._zero(handle, self.scratch_chunk_bytes)
                self._scratch_chunk = handle
            return self._scratch_chunk

    @property
    def scratch_bytes(self) -> int:
        """Device memory the scratch handles hold."""
        return self.granularity + (
            self.scratch_chunk_bytes if self._scratch_chunk else 0
        )

    def _zero(self, handle: Any, nbytes: int) -> None:
        """Map a scratch handle once and fill it with zeros (fresh memory is not)."""
        drv = self.api.driver
        g = self.granularity
        va = int(
            self.api.check(
                drv.cuMemAddressReserve(nbytes, g, 0, 0), "cuMemAddressReserve"
            )
        )
        try:
            self.api.check(drv.cuMemMap(va, nbytes, 0, handle, 0), "cuMemMap(scratch)")
            try:
                self.api.check(
                    drv.cuMemSetAccess(va, nbytes, self.access, len(self.access)),
                    "cuMemSetAccess",
                )
                self.api.tensor_over(
                    va, nbytes, torch.uint8, (nbytes,), owner=None
                ).zero_()
                self.api.synchronize()
            finally:
                self.api.check(drv.cuMemUnmap(va, nbytes), "cuMemUnmap(scratch)")
        finally:
            self.api.check(drv.cuMemAddressFree(va, nbytes), "cuMemAddressFree")

    def close(self) -> None:
        """Stop the refill thread and release the spares (reservations still alive keep
        the scratch handle mapped; the driver frees it with their last mapping)."""
        if self._closed:
            return
        self._closed = True
        self._refill_wanted.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.trim_spares()
        self._release_handle(self.scratch)
        if self._scratch_chunk is not None:
            self._release_handle(self._scratch_chunk)
