"""A fake of the CUDA driver's virtual memory API over host memory, with the driver's rules.

Reservations are ``PROT_NONE`` host mappings; a physical handle is a memfd; ``cuMemMap`` maps
the memfd over the range (``MAP_FIXED | MAP_SHARED``, so one handle mapped at many addresses
aliases, as on a GPU) still without access; ``cuMemSetAccess`` makes it readable and
writable; ``cuMemUnmap`` puts ``PROT_NONE`` back. Touching a range without access is a real
fault (SIGSEGV), as an unmapped GPU address is an illegal-address error that kills the CUDA
context. The rules enforced, each an error result as the real driver returns it (the codes
are cuda-python's own ``CUresult`` members):

- sizes and addresses of ``cuMemCreate`` / ``cuMemMap`` / ``cuMemUnmap`` are multiples of the
  MINIMUM granularity (the RECOMMENDED one is larger, to catch a mix-up);
- ``cuMemMap`` maps a whole handle (offset 0, size == handle size) into one reservation, and
  never over a range that is mapped already;
- ``cuMemUnmap`` takes exactly a union of whole, contiguous mappings: never part of one;
- ``cuMemSetAccess`` covers only fully mapped ranges; access is reset by an unmap;
- handles are reference counted: the memory lives until released and unmapped everywhere;
  releasing an unknown (or already released) handle is a test failure, as it is undefined
  behaviour on the real driver;
- ``cuMemAddressFree`` takes exactly a reservation with no mapping left in it;
- device memory is finite (``capacity``), and any call can be made to fail (``fail_next``);
- new memory can be made dirty (``dirty_new_memory``), as a GPU's is: nothing reads zeros
  that it did not write, except through the scratch granule the backing zeroes itself;
- one stream: a queued kernel's accesses (`queue_accesses`, or every op run under
  `fake_cuda_kernels.QueuedKernels`) stay in flight until the device finishes it (`finish`,
  a synchronize, a passed fence); ``cuMemUnmap`` over an address in flight is an illegal
  address (`FakeIllegalAddress`), as a remap under a running kernel is on a GPU.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
from dataclasses import dataclass, field
from typing import Any

import cuda.bindings.driver as real_driver
import torch

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
]  # fmt: skip
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FIXED = 0x10
_PROT_NONE = 0
_MAP_NORESERVE = 0x4000
_MAP_FAILED = ctypes.c_void_p(-1).value

CUresult = real_driver.CUresult
SUCCESS = CUresult.CUDA_SUCCESS
INVALID_VALUE = CUresult.CUDA_ERROR_INVALID_VALUE
OUT_OF_MEMORY = CUresult.CUDA_ERROR_OUT_OF_MEMORY
MIB = 1 << 20


class FakeIllegalAddress(AssertionError):
    """A mapping changed under a kernel still in flight: the real driver's illegal address,
    which kills the CUDA context (a test failure, never a code to handle)."""


def _mmap(addr: int | None, size: int, prot: int, flags: int, fd: int = -1) -> int:
    result = _libc.mmap(addr, size, prot, flags, fd, 0)
    if result in (None, _MAP_FAILED):
        raise OSError(ctypes.get_errno(), f"mmap failed: {os.strerror(ctypes.get_errno())}")
    return int(result)


@dataclass
class _Handle:
    size: int
    fd: int
    refs: int = 1  # the creation reference plus one per mapping
    released: bool = False


@dataclass
class _Mapping:
    start: int
    size: int
    handle: int
    accessible: bool = False


@dataclass
class _Reservation:
    start: int
    size: int
    raw: int
    raw_size: int
    mappings: list[_Mapping] = field(default_factory=list)  # sorted by start


class FakeDriver:
    """The subset of ``cuda.bindings.driver`` the KV backing calls, with the rules above.
    Anything else (enums, structs) is the real module's."""

    def __init__(
        self,
        *,
        capacity: int = 256 * MIB,
        min_granularity: int = 64 * 1024,
        recommended_granularity: int = 2 * MIB,
        vmm_supported: bool = True,
        dirty_new_memory: bool = False,
    ) -> None:
        self.capacity = capacity
        self.min_granularity = min_granularity
        self.recommended_granularity = recommended_granularity
        self.vmm_supported = vmm_supported
        # A GPU's fresh memory is not zeroed: with this, new handles hold a 0xAB pattern.
        self.dirty_new_memory = dirty_new_memory
        self.handles: dict[int, _Handle] = {}
        self.reservations: list[_Reservation] = []  # sorted by start
        self._next_handle = 1
        self._failures: dict[str, list[CUresult]] = {}
        self.calls: dict[str, int] = {}
        self.log: list[tuple[str, int, int]] = []
        # The stream: (start, end, launch) of each queued kernel's accesses not yet finished.
        self.in_flight: list[tuple[int, int, int]] = []
        self.launched = 0
        self.finished = 0
        self.faults: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(real_driver, name)

    # -- fault injection and inspection ---------------------------------------------------

    def fail_next(self, name: str, error: CUresult = OUT_OF_MEMORY, times: int = 1) -> None:
        self._failures.setdefault(name, []).extend([error] * times)

    def _enter(self, name: str) -> CUresult | None:
        self.calls[name] = self.calls.get(name, 0) + 1
        pending = self._failures.get(name)
        return pending.pop(0) if pending else None

    @property
    def physical_bytes(self) -> int:
        """Device memory held: every handle not yet freed (released and unmapped)."""
        return sum(h.size for h in self.handles.values())

    @property
    def live_handles(self) -> int:
        return len(self.handles)

    def mapping_at(self, address: int) -> _Mapping | None:
        res = self._reservation_of(address, 1)
        if res is None:
            return None
        for m in res.mappings:
            if m.start <= address < m.start + m.size:
                return m
        return None

    # -- the stream ---------------------------------------------------------------------------

    def queue_accesses(self, ranges: list[tuple[int, int]]) -> int:
        """A kernel is queued that reads or writes these ``[start, end)`` address ranges; they
        stay in flight until the device finishes it. Returns its launch number."""
        self.launched += 1
        self.in_flight.extend((start, end, self.launched) for start, end in ranges)
        return self.launched

    def finish(self, launch: int | None = None) -> None:
        """The device finished every kernel up to ``launch`` (all of them: None)."""
        self.finished = self.launched if launch is None else max(self.finished, launch)
        self.in_flight = [a for a in self.in_flight if a[2] > self.finished]

    def _check_not_in_flight(self, ptr: int, size: int, call: str) -> None:
        for start, end, launch in self.in_flight:
            if start < ptr + size and ptr < end:
                fault = (
                    f"{call} of [{ptr:#x}, {ptr + size:#x}) while kernel {launch} (of "
                    f"{self.launched}; finished: {self.finished}) accesses [{start:#x}, {end:#x})"
                )
                self.faults.append(fault)
                raise FakeIllegalAddress(fault)

    # -- driver calls ----------------------------------------------------------------------

    def cuDeviceGetAttribute(self, attribute: Any, device: int) -> tuple[CUresult, int]:
        injected = self._enter("cuDeviceGetAttribute")
        if injected is not None:
            return (injected, None)
        vmm = real_driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
        if int(attribute) == int(vmm):
            return (SUCCESS, int(self.vmm_supported))
        return (SUCCESS, 0)

    def cuMemGetAllocationGranularity(self, prop: Any, option: Any) -> tuple[CUresult, int]:
        self._enter("cuMemGetAllocationGranularity")
        minimum = real_driver.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
        if int(option) == int(minimum):
            return (SUCCESS, self.min_granularity)
        return (SUCCESS, self.recommended_granularity)

    def cuMemGetInfo(self) -> tuple[CUresult, int, int]:
        return (SUCCESS, self.capacity - self.physical_bytes, self.capacity)

    def cuMemAddressReserve(
        self, size: int, alignment: int, addr: int, flags: int
    ) -> tuple[CUresult, int | None]:
        injected = self._enter("cuMemAddressReserve")
        if injected is not None:
            return (injected, None)
        size, alignment = int(size), int(alignment)
        if size <= 0 or size % mmap.PAGESIZE or flags:
            return (INVALID_VALUE, None)
        if alignment and alignment & (alignment - 1):
            return (INVALID_VALUE, None)
        align = max(alignment, self.recommended_granularity)
        raw_size = size + align
        raw = _mmap(None, raw_size, _PROT_NONE, _private_noreserve())
        start = -(-raw // align) * align
        res = _Reservation(start=start, size=size, raw=raw, raw_size=raw_size)
        bisect.insort(self.reservations, res, key=lambda r: r.start)
        return (SUCCESS, start)

    def cuMemAddressFree(self, ptr: int, size: int) -> tuple[CUresult]:
        self._enter("cuMemAddressFree")
        res = self._reservation_of(int(ptr), 1)
        if res is None or res.start != int(ptr) or res.size != int(size):
            return (INVALID_VALUE,)
        if res.mappings:
            return (INVALID_VALUE,)  # undocumented on the real driver: be strict
        _libc.munmap(res.raw, res.raw_size)
        self.reservations.remove(res)
        return (SUCCESS,)

    def cuMemCreate(self, size: int, prop: Any, flags: int) -> tuple[CUresult, int | None]:
        injected = self._enter("cuMemCreate")
        if injected is not None:
            return (injected, None)
        size = int(size)
        if size <= 0 or size % self.min_granularity or flags:
            return (INVALID_VALUE, None)
        if self.physical_bytes + size > self.capacity:
            return (OUT_OF_MEMORY, None)
        fd = os.memfd_create("fake-cuda-handle")
        os.ftruncate(fd, size)
        if self.dirty_new_memory:
            chunk = b"\xab" * min(size, MIB)
            for offset in range(0, size, len(chunk)):
                os.pwrite(fd, chunk[: size - offset], offset)
        handle = self._next_handle
        self._next_handle += 1
        self.handles[handle] = _Handle(size=size, fd=fd)
        self.log.append(("create", handle, size))
        return (SUCCESS, handle)

    def cuMemRelease(self, handle: int) -> tuple[CUresult]:
        self._enter("cuMemRelease")
        h = self.handles.get(int(handle))
        # Undefined behaviour on the real driver: a bug here, never a code to handle.
        assert h is not None and not h.released, f"cuMemRelease of unknown handle {handle}"
        h.released = True
        self._unref(int(handle))
        return (SUCCESS,)

    def cuMemMap(
        self, ptr: int, size: int, offset: int, handle: int, flags: int
    ) -> tuple[CUresult]:
        injected = self._enter("cuMemMap")
        if injected is not None:
            return (injected,)
        ptr, size, handle = int(ptr), int(size), int(handle)
        g = self.min_granularity
        h = self.handles.get(handle)
        assert h is not None and not h.released, f"cuMemMap of unknown handle {handle}"
        if ptr % g or size % g or size <= 0 or flags:
            return (INVALID_VALUE,)
        if int(offset) != 0 or size != h.size:
            return (INVALID_VALUE,)  # no partial-handle maps ("offset currently must be 0")
        res = self._reservation_of(ptr, size)
        if res is None:
            return (INVALID_VALUE,)
        if any(m.start < ptr + size and ptr < m.start + m.size for m in res.mappings):
            return (INVALID_VALUE,)  # mapping over a mapped range
        _mmap(ptr, size, _PROT_NONE, mmap.MAP_SHARED | _MAP_FIXED, h.fd)
        bisect.insort(res.mappings, _Mapping(ptr, size, handle), key=lambda m: m.start)
        h.refs += 1
        self.log.append(("map", ptr, size))
        return (SUCCESS,)

    def cuMemUnmap(self, ptr: int, size: int) -> tuple[CUresult]:
        injected = self._enter("cuMemUnmap")
        if injected is not None:
            return (injected,)
        ptr, size = int(ptr), int(size)
        if ptr % self.min_granularity or size % self.min_granularity or size <= 0:
            return (INVALID_VALUE,)
        res = self._reservation_of(ptr, size)
        if res is None:
            return (INVALID_VALUE,)
        covered = self._whole_mappings(res, ptr, size)
        if covered is None:
            return (INVALID_VALUE,)  # part of a mapping, or a hole in the range
        self._check_not_in_flight(ptr, size, "cuMemUnmap")
        _mmap(ptr, size, _PROT_NONE, _private_noreserve() | _MAP_FIXED)
        for m in covered:
            res.mappings.remove(m)
            self._unref(m.handle)
        self.log.append(("unmap", ptr, size))
        return (SUCCESS,)

    def cuMemSetAccess(self, ptr: int, size: int, desc: Any, count: int) -> tuple[CUresult]:
        injected = self._enter("cuMemSetAccess")
        if injected is not None:
            return (injected,)
        if not isinstance(desc, (list, tuple)) or len(desc) != int(count) or not desc:
            raise TypeError("cuMemSetAccess takes a list of CUmemAccessDesc")
        ptr, size = int(ptr), int(size)
        res = self._reservation_of(ptr, size)
        if res is None:
            return (INVALID_VALUE,)
        covered = self._whole_mappings(res, ptr, size)
        if covered is None:
            return (INVALID_VALUE,)
        if _libc.mprotect(ptr, size, mmap.PROT_READ | mmap.PROT_WRITE) != 0:
            raise OSError(ctypes.get_errno(), "mprotect failed")
        for m in covered:
            m.accessible = True
        return (SUCCESS,)

    # -- internals ----------------------------------------------------------------------------

    def _reservation_of(self, ptr: int, size: int) -> _Reservation | None:
        for res in self.reservations:
            if res.start <= ptr and ptr + size <= res.start + res.size:
                return res
        return None

    @staticmethod
    def _whole_mappings(res: _Reservation, ptr: int, size: int) -> list[_Mapping] | None:
        """The mappings that exactly tile ``[ptr, ptr + size)``, or None."""
        covered = [m for m in res.mappings if m.start < ptr + size and ptr < m.start + m.size]
        cursor = ptr
        for m in covered:
            if m.start != cursor:
                return None
            cursor += m.size
        return covered if cursor == ptr + size else None

    def _unref(self, handle: int) -> None:
        h = self.handles[handle]
        h.refs -= 1
        if h.refs == 0:
            os.close(h.fd)
            del self.handles[handle]
            self.log.append(("free", handle, h.size))


def _private_noreserve() -> int:
    return mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE


class FakeVmmApi:
    """`VmmApi` over the fake: CPU tensors at the fake device addresses."""

    def __init__(self, driver: FakeDriver | None = None) -> None:
        self.driver = driver or FakeDriver()
        self.syncs = 0
        self.bound_threads = 0
        self.reclaims = 0
        self.fences: list[FakeFence] = []
        # Called at each reclaim (a test frees "torch's cached memory" there).
        self.on_reclaim: list[Any] = []

    def check(self, result: Any, label: str) -> Any:
        if not isinstance(result, tuple):
            result = (result,)
        if result[0] != SUCCESS:
            raise RuntimeError(f"{label}: {result[0]}")
        return result[1] if len(result) > 1 else None

    def allocation_prop(self, device_id: int) -> Any:
        prop = real_driver.CUmemAllocationProp()
        prop.type = real_driver.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = real_driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = int(device_id)
        return prop

    def granularity(self, prop: Any, *, minimum: bool) -> int:
        flags = real_driver.CUmemAllocationGranularity_flags
        flag = (
            flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
            if minimum
            else flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED
        )
        return int(self.check(self.driver.cuMemGetAllocationGranularity(prop, flag), "granularity"))

    def access_desc(self, device_id: int) -> Any:
        desc = real_driver.CUmemAccessDesc()
        desc.location.type = real_driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        desc.location.id = int(device_id)
        desc.flags = real_driver.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        return desc

    def tensor_over(
        self, address: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...], owner: Any
    ) -> torch.Tensor:
        buffer = (ctypes.c_uint8 * nbytes).from_address(address)
        buffer._kv_owner = owner  # the tensor keeps the buffer, the buffer keeps the owner
        return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).view(shape)

    def synchronize(self) -> None:
        self.syncs += 1
        self.driver.finish()

    def bind_thread(self) -> None:
        self.bound_threads += 1

    def record_fence(self, streams: tuple[Any, ...] = ()) -> FakeFence:
        """A fence behind every kernel queued so far: done once the device finished them
        (`FakeDriver.finish`, `work_done`, a synchronize)."""
        fence = FakeFence(self.driver, self.driver.queue_accesses([]))  # a marker, as an event
        self.fences.append(fence)
        return fence

    def work_done(self) -> None:
        """The device finished its queue: every fence recorded so far is passed."""
        self.driver.finish()
        for fence in self.fences:
            fence.passed = True
        self.fences.clear()

    def reclaim(self) -> None:
        self.reclaims += 1
        for callback in self.on_reclaim:
            callback()


class FakeFence:
    def __init__(self, driver: FakeDriver | None = None, launch: int = 0) -> None:
        self.passed = False
        self._driver = driver
        self._launch = launch

    def done(self) -> bool:
        if not self.passed and self._driver is not None:
            self.passed = self._driver.finished >= self._launch
        return self.passed


# -- the fake as a server's driver (test/e2e: SGLANG_KVALLOC_TEST_VMM_API=fake_cuda:server_api)

SERVER_REPORT_ENV = "SGLANG_KVALLOC_FAKE_CUDA_REPORT"
SERVER_GRANULARITY_ENV = "SGLANG_KVALLOC_FAKE_CUDA_GRANULARITY"
SERVER_CAPACITY_ENV = "SGLANG_KVALLOC_FAKE_CUDA_CAPACITY"
# A file next to the report: a test writes a byte count there to change the device's memory
# while the server runs (a device that fills up, or gets memory back).
CAPACITY_FILE_SUFFIX = ".capacity"


class ServerFakeVmmApi(FakeVmmApi):
    """The fake driver in a CPU-engine server: the engine runs each step to its end before
    the scheduler goes on, so fences have passed by the time anyone asks. Fresh memory is
    dirty, as a GPU's. Every half second it writes what the tests check to a JSON file:
    device synchronizes, memory held and whether the shared scratch granule (the first handle
    the backing creates) still holds only zeros."""

    def __init__(self, driver: FakeDriver, report: str | None) -> None:
        super().__init__(driver)
        self._report = report
        if report:
            import threading

            threading.Thread(target=self._report_loop, daemon=True).start()

    def record_fence(self, streams: tuple[Any, ...] = ()) -> FakeFence:
        fence = FakeFence()
        fence.passed = True
        return fence

    def report(self) -> dict[str, Any]:
        drv = self.driver
        # The scratch handles: the first one created, and any mapped at several addresses
        # (the scratch chunk; a committed handle is mapped once).
        scratch = [h for n, h in drv.handles.items() if n == 1 or h.refs > 2]
        nonzero = -1 if not scratch else 0
        for handle in scratch:
            data = os.pread(handle.fd, handle.size, 0)
            nonzero += handle.size - data.count(0)
        return {
            "device_synchronizes": self.syncs,
            "physical_bytes": drv.physical_bytes,
            "live_handles": drv.live_handles,
            "scratch_mappings": sum(handle.refs - 1 for handle in scratch),
            "scratch_nonzero_bytes": nonzero,
            "calls": dict(drv.calls),
        }

    def _report_loop(self) -> None:
        import json
        import time

        control = f"{self._report}{CAPACITY_FILE_SUFFIX}"
        while True:
            time.sleep(0.5)
            try:
                with open(control) as f:
                    self.driver.capacity = int(f.read())
            except (OSError, ValueError):
                pass
            tmp = f"{self._report}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.report(), f)
            os.replace(tmp, self._report)


def server_api() -> ServerFakeVmmApi:
    """The `VmmApi` a CPU-engine server builds from the environment (see the constants)."""
    granularity = int(os.environ.get(SERVER_GRANULARITY_ENV, 64 * 1024))
    driver = FakeDriver(
        capacity=int(os.environ.get(SERVER_CAPACITY_ENV, 2048 * MIB)),
        min_granularity=granularity,
        recommended_granularity=granularity,
        dirty_new_memory=True,
    )
    return ServerFakeVmmApi(driver, os.environ.get(SERVER_REPORT_ENV))
