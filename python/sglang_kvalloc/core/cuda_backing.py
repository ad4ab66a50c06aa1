"""A `Backing` on the CUDA driver's virtual memory API: reserve once, map segments in and out.

- The whole range is reserved once (``cuMemAddressReserve``) and exposed as one tensor whose
  address never changes, so CUDA graphs, the radix cache and every kernel see fixed indices.
- Every granule that is not committed is mapped to one shared *scratch* handle (zero-filled,
  one granule, kvcached's zero-page design): a kernel that touches an unbacked slot (graph
  padding, a stray index) reads zeros instead of faulting, which would kill the process's
  CUDA context. Commit swaps the scratch mappings of a range for one real handle; release
  swaps them back. ``cuMemUnmap`` cannot unmap part of a mapping, so each committed range is
  its own mapping with its own handle, and releases are of whole committed ranges.
- A mapping changes only where no queued kernel can touch the range (kvcached's PR #465 saw
  illegal accesses otherwise): after a device synchronize, or where the caller knows the
  range is unused (``unused=True``: rows past every reader's reach, granules whose readers
  finished behind a fence). Callers commit and release at scheduler sync points.
- A failed map is rolled back whole (the range goes back to scratch) and reported as a
  failed commit (MemoryError); a range that cannot be given its scratch mappings back would
  be an illegal address, so that is `VmmMappingLostError` and the backing refuses all use.
- ``cuMemCreate`` is the slow call (~190 us per 2 MB measured on A100 by kvcached): a small
  pool of pre-created handles per size is kept, refilled by a background thread, so a
  commit usually only maps.

The driver calls go through a `VmmApi`: cuda-python's ``cuda.bindings.driver`` with upstream's
helpers in the server (`sglang_kvalloc.upstream.cuda_vmm`), a fake with the driver's rules
over host memory in CI. This module imports neither.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any, Protocol

import torch

from sglang_kvalloc.core.backing import (
    BackingUnavailableError,
    Fence,
    RangeSet,
    check_range,
    tensor_bytes,
)

__all__ = [
    "CudaBackingFactory",
    "CudaVmmBacking",
    "Fence",
    "VmmApi",
    "VmmDevice",
    "VmmMappingLostError",
]


logger = logging.getLogger(__name__)


class VmmMappingLostError(RuntimeError):
    """Part of a reservation is left without any mapping (a device access there would kill
    the CUDA context): the process cannot go on serving safely."""


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

    def record_fence(self, streams: tuple[Any, ...] = ()) -> Fence:
        """A fence behind the work queued so far on the current stream and on ``streams``."""
        ...

    def reclaim(self) -> None:
        """Give cached-but-free device memory back to the driver (torch's caching
        allocator), before a failed allocation is taken as final."""
        ...


def _SUCCESS(drv: Any) -> Any:  # noqa: N802 - the driver's constant
    return drv.CUresult.CUDA_SUCCESS


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
        self.reclaims = 0
        # Held by the refill thread while it creates a handle, and by `refill_paused` for a
        # whole CUDA graph capture: no other thread's driver work runs during a capture.
        self._refill_gate = threading.Lock()
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
            try:
                handle = self._create_handle(nbytes)
            except MemoryError:
                # Free memory torch's cache holds may be what is missing: give it back once.
                self.api.reclaim()
                self.reclaims += 1
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

    def ready_handles(self, nbytes: int, count: int) -> int:
        """Create spare handles of ``nbytes`` on this thread until ``count`` are held (or the
        device is full, after one reclaim); returns how many are held. They serve the next
        commits; what is left over goes at the next `trim_spares`."""
        with self._spare_lock:
            held = len(self._spares.get(nbytes, []))
        reclaimed = False
        while held < count:
            try:
                handle = self._create_handle(nbytes)
            except MemoryError:
                if reclaimed:
                    break
                self.api.reclaim()
                self.reclaims += 1
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
            except Exception:  # noqa: BLE001 - a refill failure must not kill the server
                logger.exception("KV VMM spare-handle refill failed")

    @contextlib.contextmanager
    def refill_paused(self) -> Iterator[None]:
        """While active the refill thread creates no handle (it waits): torch captures CUDA
        graphs in the global capture mode, where another thread's driver calls can invalidate
        the capture. Waits for a creation in progress to end first."""
        with self._refill_gate:
            yield

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
        """Map the scratch handle over ``[offset, offset + nbytes)`` (unmapped now), granule
        by granule, retrying a failed map once; a range left with any hole is
        `VmmMappingLostError` (an access there would kill the CUDA context)."""
        api = self.device.api
        drv = api.driver
        g = self.device.granularity
        for start in range(offset, offset + nbytes, g):
            address = self.address + start
            if drv.cuMemMap(address, g, 0, self.device.scratch, 0)[0] == _SUCCESS(drv):
                continue
            result = drv.cuMemMap(address, g, 0, self.device.scratch, 0)
            if result[0] != _SUCCESS(drv):
                raise VmmMappingLostError(
                    f"cuMemMap(scratch) failed twice ({result[0]}) at offset {start} of a "
                    f"{self.size}-byte reservation: part of it is unmapped"
                )
        for _attempt in range(2):
            result = drv.cuMemSetAccess(
                self.address + offset, nbytes, self.device.access, len(self.device.access)
            )
            if result[0] == _SUCCESS(drv):
                return
        raise VmmMappingLostError(
            f"cuMemSetAccess(scratch) failed twice ({result[0]}) over [{offset}, "
            f"{offset + nbytes}) of a reservation: that range is not accessible"
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
        self._broken = ""

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

    def commit(self, offset: int, nbytes: int, *, unused: bool = False) -> None:
        """Back ``[offset, offset + nbytes)`` with one new mapping; a no-op if exactly that is
        committed. MemoryError (nothing changed) if the device cannot back it or the driver
        refuses the mapping (rolled back whole). ``unused``: no queued kernel touches the
        range, so no device synchronize first."""
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
        if not unused:
            self._sync()
        result = drv.cuMemUnmap(address, nbytes)
        if result[0] != _SUCCESS(drv):
            self.device.give_back(handle, nbytes)
            raise MemoryError(f"cuMemUnmap(scratch) failed: {result[0]}")
        failure = drv.cuMemMap(address, nbytes, 0, handle, 0)[0]
        if failure == _SUCCESS(drv):
            failure = drv.cuMemSetAccess(address, nbytes, self.device.access, 1)[0]
            if failure != _SUCCESS(drv):
                self._unmap_or_lose(address, nbytes)
        if failure != _SUCCESS(drv):
            # The range must never stay unmapped: scratch back over all of it, or stop.
            self._guarded_map_scratch(reservation, offset, nbytes)
            self.device.give_back(handle, nbytes)
            raise MemoryError(f"mapping {nbytes} bytes failed: {failure}")
        self._mappings[offset] = (nbytes, handle)
        self._committed.add(offset, offset + nbytes)

    def release(self, offset: int, nbytes: int, *, unused: bool = False) -> None:
        """Unmap the committed ranges inside ``[offset, offset + nbytes)`` (whole mappings
        only) and map the scratch handle there again; a no-op where nothing is committed.
        ``unused``: no queued kernel touches the range, so no device synchronize first."""
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
        if not unused:
            self._sync()
        for start in inside:
            size, handle = self._mappings[start]
            result = self.device.api.driver.cuMemUnmap(reservation.address + start, size)
            if result[0] != _SUCCESS(self.device.api.driver):
                # Still mapped to its handle: committed as before, nothing lost.
                raise RuntimeError(f"cuMemUnmap failed: {result[0]}")
            del self._mappings[start]
            self._committed.remove(start, start + size)
            self._guarded_map_scratch(reservation, start, size)
            self.device.give_back(handle, size)

    def _unmap_or_lose(self, address: int, nbytes: int) -> None:
        drv = self.device.api.driver
        if drv.cuMemUnmap(address, nbytes)[0] != _SUCCESS(drv):
            self._broken = f"a mapping at {address:#x} could not be undone"
            raise VmmMappingLostError(self._broken)

    def _guarded_map_scratch(self, reservation: _Reservation, offset: int, nbytes: int) -> None:
        try:
            reservation.map_scratch(offset, nbytes)
        except VmmMappingLostError as exc:
            self._broken = str(exc)
            raise

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
        if self._broken:
            raise VmmMappingLostError(f"backing unusable: {self._broken}")
        return self._reservation

    def _check_range(self, offset: int, nbytes: int) -> None:
        check_range(offset, nbytes, self.granularity, self._reserved)


class CudaBackingFactory:
    """`CudaVmmBacking` on one device; spares are pre-created handles of the device."""

    faults_in = False

    def __init__(self, device: VmmDevice) -> None:
        self.device = device
        self.granularity: int = device.granularity

    def __call__(self, nbytes: int) -> CudaVmmBacking:
        return CudaVmmBacking(nbytes, self.device)

    def keep_spares(self, nbytes: int, count: int) -> None:
        self.device.keep_spares(nbytes, count)

    def trim_spares(self) -> int:
        return self.device.trim_spares()

    def fence(self, streams: tuple[Any, ...] = ()) -> Fence:
        return self.device.api.record_fence(streams)

    def ready_handles(self, nbytes: int, count: int) -> int:
        return self.device.ready_handles(nbytes, count)

    def refill_paused(self) -> contextlib.AbstractContextManager[None]:
        return self.device.refill_paused()
