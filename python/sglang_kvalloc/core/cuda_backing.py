"""A `Backing` on the CUDA driver's virtual memory API: reserve once, map segments in and out.

- The whole range is reserved once (``cuMemAddressReserve``) and exposed as one tensor whose
  address never changes, so CUDA graphs, the radix cache and every kernel see fixed indices.
- Every granule that is not committed is mapped to one shared *scratch* handle (zero-filled,
  one granule, kvcached's zero-page design): a kernel that touches an unbacked slot (graph
  padding, a stray index) reads zeros instead of faulting, which would kill the process's
  CUDA context. Commit swaps the scratch mappings of a range for one real handle; release
  swaps them back. ``cuMemUnmap`` cannot unmap part of a mapping, so each committed range is
  its own mapping with its own handle, and releases are of whole committed ranges.
- Mappings change only after the device is synchronized (no kernel in flight can touch the
  range while its mapping changes: kvcached's PR #465 saw illegal accesses otherwise).
  Callers commit and release at scheduler sync points, never inside a kernel launch.
- ``cuMemCreate`` is the slow call (~190 us per 2 MB measured on A100 by kvcached): a small
  pool of pre-created handles per size is kept, refilled by a background thread, so a
  commit usually only maps.

The driver calls go through a `VmmApi`: cuda-python's ``cuda.bindings.driver`` with upstream's
helpers in the server (`sglang_kvalloc.upstream.cuda_vmm`), a fake with the driver's rules
over host memory in CI. This module imports neither.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

import torch

from sglang_kvalloc.core.backing import (
    BackingUnavailableError,
    RangeSet,
    check_range,
    tensor_bytes,
)

__all__ = ["CudaBackingFactory", "CudaVmmBacking", "VmmApi", "VmmDevice"]

logger = logging.getLogger(__name__)


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
        self, address: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...], owner: Any
    ) -> torch.Tensor:
        """A tensor over ``[address, address + nbytes)`` that keeps ``owner`` alive for as
        long as it or any view of it lives."""
        ...

    def synchronize(self) -> None:
        """Wait until no kernel is in flight on the device."""
        ...

    def bind_thread(self) -> None:
        """Make the device current on the calling thread (for the refill thread)."""
        ...


def _align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


class VmmDevice:
    """Per-device state shared by every backing on it: the allocation properties, the
    granularity, the zero-filled scratch handle, and the pool of spare handles."""

    _instances: dict[tuple[int, int], VmmDevice] = {}
    _lock = threading.Lock()

    def __init__(self, api: VmmApi, device_id: int, *, background_refill: bool = True) -> None:
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
        self._refill_wanted = threading.Event()
        self._closed = False
        self.scratch = self._create_handle(self.granularity)
        self._zero_scratch()
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
        attribute = drv.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
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
        """A physical handle of ``nbytes``: a pre-created one if there is one (then the pool
        is refilled off this path), else created now (MemoryError when the device is full)."""
        with self._spare_lock:
            spares = self._spares.get(nbytes)
            handle = spares.pop() if spares else None
        if handle is not None:
            self.spare_hits += 1
        else:
            self.spare_misses += 1
            handle = self._create_handle(nbytes)
        self._refill_wanted.set()
        return handle

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
                self.refill()
            except Exception:  # noqa: BLE001 - a refill failure must not kill the server
                logger.exception("KV VMM spare-handle refill failed")

    # -- scratch --------------------------------------------------------------------------

    def _zero_scratch(self) -> None:
        """Map the scratch handle once and fill it with zeros (fresh memory is not)."""
        drv = self.api.driver
        g = self.granularity
        va = int(self.api.check(drv.cuMemAddressReserve(g, g, 0, 0), "cuMemAddressReserve"))
        try:
            self.api.check(drv.cuMemMap(va, g, 0, self.scratch, 0), "cuMemMap(scratch)")
            try:
                self.api.check(
                    drv.cuMemSetAccess(va, g, self.access, len(self.access)), "cuMemSetAccess"
                )
                self.api.tensor_over(va, g, torch.uint8, (g,), owner=None).zero_()
                self.api.synchronize()
            finally:
                self.api.check(drv.cuMemUnmap(va, g), "cuMemUnmap(scratch)")
        finally:
            self.api.check(drv.cuMemAddressFree(va, g), "cuMemAddressFree")

    def close(self) -> None:
        """Stop the refill thread and release the spares (reservations still alive keep the
        scratch handle mapped; the driver frees it with their last mapping)."""
        if self._closed:
            return
        self._closed = True
        self._refill_wanted.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.trim_spares()
        self._release_handle(self.scratch)


class _Reservation:
    """The reserved range; unmapped and freed when the backing is closed and the last tensor
    view over it is gone (a view over a freed range would read another allocation)."""

    def __init__(self, device: VmmDevice, size: int) -> None:
        self.device = device
        self.size = size
        self.address = 0
        api = device.api
        drv = api.driver
        g = device.granularity
        self.address = int(api.check(drv.cuMemAddressReserve(size, g, 0, 0), "cuMemAddressReserve"))
        mapped = 0
        try:
            for offset in range(0, size, g):
                api.check(
                    drv.cuMemMap(self.address + offset, g, 0, device.scratch, 0),
                    "cuMemMap(scratch)",
                )
                mapped = offset + g
            api.check(
                drv.cuMemSetAccess(self.address, size, device.access, len(device.access)),
                "cuMemSetAccess",
            )
        except BaseException:
            if mapped:
                drv.cuMemUnmap(self.address, mapped)
            drv.cuMemAddressFree(self.address, size)
            self.address = 0
            raise

    def map_scratch(self, offset: int, nbytes: int) -> None:
        api = self.device.api
        drv = api.driver
        g = self.device.granularity
        for start in range(offset, offset + nbytes, g):
            api.check(
                drv.cuMemMap(self.address + start, g, 0, self.device.scratch, 0),
                "cuMemMap(scratch)",
            )
        api.check(
            drv.cuMemSetAccess(
                self.address + offset, nbytes, self.device.access, len(self.device.access)
            ),
            "cuMemSetAccess",
        )

    def __del__(self) -> None:
        if not self.address:
            return
        try:
            api = self.device.api
            api.synchronize()
            # Everything is mapped (scratch or real): one unmap over the whole range.
            api.driver.cuMemUnmap(self.address, self.size)
            api.driver.cuMemAddressFree(self.address, self.size)
        except Exception:  # noqa: BLE001 - interpreter shutdown; the driver frees it anyway
            pass
        self.address = 0


class CudaVmmBacking:
    """Reserved device memory exposed as one fixed-address tensor; committed per range."""

    def __init__(self, nbytes: int, device: VmmDevice) -> None:
        if nbytes <= 0:
            raise ValueError(f"reservation size must be positive, got {nbytes} bytes")
        self.device = device
        self.granularity: int = device.granularity
        self._reserved = _align_up(nbytes, self.granularity)
        self._reservation: _Reservation | None = _Reservation(device, self._reserved)
        self._address = self._reservation.address
        # offset -> (nbytes, handle) of each committed mapping.
        self._mappings: dict[int, tuple[int, Any]] = {}
        self._committed = RangeSet()
        self.syncs = 0

    @property
    def reserved_bytes(self) -> int:
        return self._reserved

    @property
    def committed_bytes(self) -> int:
        return self._committed.total

    @property
    def address(self) -> int:
        return self._address

    def committed_ranges(self) -> list[tuple[int, int]]:
        return self._committed.intervals()

    def is_committed(self, offset: int, nbytes: int) -> bool:
        return self._committed.overlap(offset, offset + nbytes) == nbytes

    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        reservation = self._live()
        nbytes = tensor_bytes(dtype, shape, self._reserved)
        return self.device.api.tensor_over(
            reservation.address, nbytes, dtype, tuple(shape), owner=reservation
        )

    def commit(self, offset: int, nbytes: int) -> None:
        """Back ``[offset, offset + nbytes)`` with one new mapping; a no-op if exactly that is
        committed; MemoryError (nothing changed) if the device cannot back it."""
        reservation = self._live()
        self._check_range(offset, nbytes)
        if nbytes == 0:
            return
        covered = self._committed.overlap(offset, offset + nbytes)
        if covered == nbytes:
            return
        if covered:
            raise ValueError(
                f"commit [{offset}, {offset + nbytes}) overlaps committed ranges partly: "
                "ranges are committed and released whole"
            )
        api = self.device.api
        drv = api.driver
        address = reservation.address + offset
        handle = self.device.take_handle(nbytes)  # MemoryError here changes nothing
        self._sync()
        api.check(drv.cuMemUnmap(address, nbytes), "cuMemUnmap(scratch)")
        try:
            api.check(drv.cuMemMap(address, nbytes, 0, handle, 0), "cuMemMap")
            try:
                api.check(
                    drv.cuMemSetAccess(address, nbytes, self.device.access, 1), "cuMemSetAccess"
                )
            except BaseException:
                drv.cuMemUnmap(address, nbytes)
                raise
        except BaseException:
            # Put the scratch mappings back: the range must never be left unmapped.
            reservation.map_scratch(offset, nbytes)
            self.device.give_back(handle, nbytes)
            raise
        self._mappings[offset] = (nbytes, handle)
        self._committed.add(offset, offset + nbytes)

    def release(self, offset: int, nbytes: int) -> None:
        """Unmap the committed ranges inside ``[offset, offset + nbytes)`` (whole mappings
        only) and map the scratch handle there again; a no-op where nothing is committed."""
        reservation = self._live()
        self._check_range(offset, nbytes)
        if nbytes == 0 or self._committed.overlap(offset, offset + nbytes) == 0:
            return
        inside = sorted(o for o in self._mappings if offset <= o < offset + nbytes)
        for start in inside:
            size, _ = self._mappings[start]
            if start + size > offset + nbytes:
                raise ValueError(
                    f"release [{offset}, {offset + nbytes}) cuts the committed range "
                    f"[{start}, {start + size}): cuMemUnmap cannot unmap part of a mapping"
                )
        if self._committed.overlap(offset, offset + nbytes) != sum(
            self._mappings[s][0] for s in inside
        ):
            raise ValueError(
                f"release [{offset}, {offset + nbytes}) starts inside a committed range"
            )
        api = self.device.api
        self._sync()
        for start in inside:
            size, handle = self._mappings.pop(start)
            api.check(api.driver.cuMemUnmap(reservation.address + start, size), "cuMemUnmap")
            reservation.map_scratch(start, size)
            self._committed.remove(start, start + size)
            self.device.give_back(handle, size)

    def close(self) -> None:
        """Release every committed range; the reservation goes with the last tensor view."""
        if self._reservation is None:
            return
        self.release(0, self._reserved)
        self._reservation = None

    def _sync(self) -> None:
        self.device.api.synchronize()
        self.syncs += 1

    def _live(self) -> _Reservation:
        if self._reservation is None:
            raise RuntimeError("backing is closed")
        return self._reservation

    def _check_range(self, offset: int, nbytes: int) -> None:
        check_range(offset, nbytes, self.granularity, self._reserved)


class CudaBackingFactory:
    """`CudaVmmBacking` on one device; spares are pre-created handles of the device."""

    def __init__(self, device: VmmDevice) -> None:
        self.device = device
        self.granularity: int = device.granularity

    def __call__(self, nbytes: int) -> CudaVmmBacking:
        return CudaVmmBacking(nbytes, self.device)

    def keep_spares(self, nbytes: int, count: int) -> None:
        self.device.keep_spares(nbytes, count)

    def trim_spares(self) -> int:
        return self.device.trim_spares()
