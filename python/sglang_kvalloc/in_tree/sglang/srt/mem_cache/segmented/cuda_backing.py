"""A `Backing` on the CUDA driver's virtual memory API: reserve once, map segments in
and out.

- The whole range is reserved once (``cuMemAddressReserve``) and exposed as one tensor
  whose address never changes, so CUDA graphs, the radix cache and every kernel see
  fixed indices.
- Every granule that is not committed is mapped to one shared *scratch* handle
  (zero-filled, one granule, kvcached's zero-page design): a kernel that touches an
  unbacked slot (graph padding, a stray index) reads zeros instead of faulting, which
  would kill the process's CUDA context. Commit swaps the scratch mappings of a range
  for one real handle; release swaps them back. ``cuMemUnmap`` cannot unmap part of a
  mapping, so each committed range is its own mapping with its own handle, and releases
  are of whole committed ranges.
- A mapping changes only where no queued kernel can touch the range (kvcached's PR #465
  saw illegal accesses otherwise): after a device synchronize, or where the caller knows
  the range is unused (``unused=True``: rows past every reader's reach, granules whose
  readers finished behind a fence). Callers commit and release at scheduler sync points.
- A failed map is rolled back whole (the range goes back to scratch) and reported as a
  failed commit (MemoryError); a range that cannot be given its scratch mappings back
  would be an illegal address, so that is `VmmMappingLostError` and the backing refuses
  all use.
- Handles come from the device's pool of pre-created ones (`vmm_device.VmmDevice`), so a
  commit usually only maps.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch

from sglang.srt.mem_cache.segmented.backing import (
    Backing,
    CommittedRanges,
    Fence,
    RangeSet,
    check_range,
    tensor_bytes,
)
from sglang.srt.mem_cache.segmented.geometry import align_up
from sglang.srt.mem_cache.segmented.vmm_device import (
    CHUNKED_RESERVATION_MIN_CHUNKS,
    VmmApi,
    VmmDevice,
    VmmMappingLostError,
    driver_success,
)

if TYPE_CHECKING:
    from sglang.srt.mem_cache.segmented.shared_budget import SharedBudget

__all__ = [
    "CudaBackingFactory",
    "CudaVmmBacking",
    "Fence",
    "VmmApi",
    "VmmDevice",
    "VmmMappingLostError",
]


class _Reservation:
    """The reserved range; unmapped and freed when the backing is closed and the last
    tensor view over it is gone (a view over a freed range would read another
    allocation).

    A large range maps the device's scratch chunk handle chunk by chunk (one mapping for
    several granules: see `SCRATCH_CHUNK_GRANULES`); the first commit in a chunk breaks
    it into granule mappings (`split`), so the chunk's other granules still read
    scratch."""

    def __init__(self, device: VmmDevice, size: int) -> None:
        self.device = device
        self.size = size
        self.address = 0
        api = device.api
        drv = api.driver
        g = device.granularity
        chunk = device.scratch_chunk_bytes
        self.chunk = chunk if size >= CHUNKED_RESERVATION_MIN_CHUNKS * chunk else 0
        # Chunks still mapped whole to the scratch chunk handle.
        self.intact: set[int] = set()
        self.address = int(
            api.check(drv.cuMemAddressReserve(size, g, 0, 0), "cuMemAddressReserve")
        )
        mapped = 0
        try:
            whole = size // self.chunk * self.chunk if self.chunk else 0
            for offset in range(0, whole, self.chunk or 1):
                api.check(
                    drv.cuMemMap(
                        self.address + offset, chunk, 0, device.scratch_chunk(), 0
                    ),
                    "cuMemMap(scratch chunk)",
                )
                self.intact.add(offset // chunk)
                mapped = offset + chunk
            for offset in range(whole, size, g):
                api.check(
                    drv.cuMemMap(self.address + offset, g, 0, device.scratch, 0),
                    "cuMemMap(scratch)",
                )
                mapped = offset + g
            api.check(
                drv.cuMemSetAccess(
                    self.address, size, device.access, len(device.access)
                ),
                "cuMemSetAccess",
            )
        except BaseException:
            if mapped:
                drv.cuMemUnmap(self.address, mapped)
            drv.cuMemAddressFree(self.address, size)
            self.address = 0
            raise

    def remap_span(self, offset: int, nbytes: int) -> tuple[int, int]:
        """The range a commit of ``[offset, offset + nbytes)`` unmaps: the whole scratch
        chunks it touches that are still mapped whole."""
        if not self.chunk or nbytes <= 0:
            return offset, offset + nbytes
        lo, hi = offset, offset + nbytes
        if lo // self.chunk in self.intact:
            lo = lo // self.chunk * self.chunk
        if (hi - 1) // self.chunk in self.intact:
            hi = ((hi - 1) // self.chunk + 1) * self.chunk
        return lo, hi

    def split(self, offset: int, nbytes: int) -> None:
        """Break the intact scratch chunks ``[offset, offset + nbytes)`` touches into
        granule mappings of the scratch handle. MemoryError (nothing changed) if the
        driver refuses to unmap one; `VmmMappingLostError` if a chunk cannot be mapped
        again."""
        if not self.chunk or nbytes <= 0:
            return
        drv = self.device.api.driver
        for index in range(
            offset // self.chunk, (offset + nbytes - 1) // self.chunk + 1
        ):
            if index not in self.intact:
                continue
            result = drv.cuMemUnmap(self.address + index * self.chunk, self.chunk)
            if result[0] != driver_success(drv):
                raise MemoryError(f"cuMemUnmap(scratch chunk) failed: {result[0]}")
            self.intact.discard(index)
            self.map_scratch(index * self.chunk, self.chunk)

    def map_scratch(self, offset: int, nbytes: int) -> None:
        """Map the scratch handle over ``[offset, offset + nbytes)`` (unmapped now),
        granule by granule, retrying a failed map once; a range left with any hole is
        `VmmMappingLostError` (an access there would kill the CUDA context)."""
        api = self.device.api
        drv = api.driver
        g = self.device.granularity
        for start in range(offset, offset + nbytes, g):
            address = self.address + start
            if drv.cuMemMap(address, g, 0, self.device.scratch, 0)[0] == driver_success(
                drv
            ):
                continue
            result = drv.cuMemMap(address, g, 0, self.device.scratch, 0)
            if result[0] != driver_success(drv):
                raise VmmMappingLostError(
                    f"cuMemMap(scratch) failed twice ({result[0]}) at offset {start} of a "
                    f"{self.size}-byte reservation: part of it is unmapped"
                )
        for _attempt in range(2):
            result = drv.cuMemSetAccess(
                self.address + offset,
                nbytes,
                self.device.access,
                len(self.device.access),
            )
            if result[0] == driver_success(drv):
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
        except Exception:  # noqa: BLE001 - at exit the driver frees it anyway
            pass
        self.address = 0


class CudaVmmBacking(CommittedRanges):
    """Reserved device memory exposed as one fixed-address tensor; committed per range."""

    def __init__(self, nbytes: int, device: VmmDevice) -> None:
        if nbytes <= 0:
            raise ValueError(f"reservation size must be positive, got {nbytes} bytes")
        self.device = device
        self.granularity: int = device.granularity
        self._reserved = align_up(nbytes, self.granularity)
        self._reservation: _Reservation | None = _Reservation(device, self._reserved)
        self._address = self._reservation.address
        # offset -> (nbytes, handle) of each committed mapping.
        self._mappings: dict[int, tuple[int, Any]] = {}
        self._committed = RangeSet()
        self.syncs = 0
        self._broken = ""

    @property
    def address(self) -> int:
        return self._address

    def remap_span(self, offset: int, nbytes: int) -> tuple[int, int]:
        """The range a commit of ``[offset, offset + nbytes)`` would unmap (it may be
        wider: a scratch chunk still mapped whole)."""
        return self._live().remap_span(offset, nbytes)

    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        reservation = self._live()
        nbytes = tensor_bytes(dtype, shape, self._reserved)
        return self.device.api.tensor_over(
            reservation.address, nbytes, dtype, tuple(shape), owner=reservation
        )

    def commit(self, offset: int, nbytes: int, *, unused: bool = False) -> None:
        """Back ``[offset, offset + nbytes)`` with one new mapping; a no-op if exactly
        that is committed. MemoryError (nothing changed) if the device cannot back it or
        the driver refuses the mapping (rolled back whole). ``unused``: no queued kernel
        touches the range, so no device synchronize first."""
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
        try:
            reservation.split(offset, nbytes)
        except MemoryError:
            self.device.give_back(handle, nbytes)
            raise
        except VmmMappingLostError as exc:
            self._broken = str(exc)
            raise
        result = drv.cuMemUnmap(address, nbytes)
        if result[0] != driver_success(drv):
            self.device.give_back(handle, nbytes)
            raise MemoryError(f"cuMemUnmap(scratch) failed: {result[0]}")
        failure = drv.cuMemMap(address, nbytes, 0, handle, 0)[0]
        if failure == driver_success(drv):
            failure = drv.cuMemSetAccess(address, nbytes, self.device.access, 1)[0]
            if failure != driver_success(drv):
                self._unmap_or_lose(address, nbytes)
        if failure != driver_success(drv):
            # The range must never stay unmapped: scratch back over all of it, or stop.
            self._guarded_map_scratch(reservation, offset, nbytes)
            self.device.give_back(handle, nbytes)
            raise MemoryError(f"mapping {nbytes} bytes failed: {failure}")
        self._mappings[offset] = (nbytes, handle)
        self._committed.add(offset, offset + nbytes)

    def release(self, offset: int, nbytes: int, *, unused: bool = False) -> None:
        """Unmap the committed ranges inside ``[offset, offset + nbytes)`` (whole
        mappings only) and map the scratch handle there again; a no-op where nothing is
        committed. ``unused``: no queued kernel touches the range, so no device
        synchronize first."""
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
            result = self.device.api.driver.cuMemUnmap(
                reservation.address + start, size
            )
            if result[0] != driver_success(self.device.api.driver):
                # Still mapped to its handle: committed as before, nothing lost.
                raise RuntimeError(f"cuMemUnmap failed: {result[0]}")
            del self._mappings[start]
            self._committed.remove(start, start + size)
            self._guarded_map_scratch(reservation, start, size)
            self.device.give_back(handle, size)

    def _unmap_or_lose(self, address: int, nbytes: int) -> None:
        drv = self.device.api.driver
        if drv.cuMemUnmap(address, nbytes)[0] != driver_success(drv):
            self._broken = f"a mapping at {address:#x} could not be undone"
            raise VmmMappingLostError(self._broken)

    def _guarded_map_scratch(
        self, reservation: _Reservation, offset: int, nbytes: int
    ) -> None:
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
        self.budget: SharedBudget | None = None  # set: its backings reserve in it

    def __call__(self, nbytes: int) -> Backing:
        backing = CudaVmmBacking(nbytes, self.device)
        return backing if self.budget is None else self.budget.reserving(backing)

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
