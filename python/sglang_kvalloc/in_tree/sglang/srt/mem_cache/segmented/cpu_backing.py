"""The CPU backing: an anonymous ``MAP_NORESERVE`` mapping committed and released in
ranges.

It implements upstream's `Backing` protocol (``sglang.srt.mem_cache.segmented.backing``)
for the CPU engine; the CUDA one is `cuda_backing.CudaVmmBacking`.
"""

from __future__ import annotations

import errno
import mmap
import platform
from typing import TYPE_CHECKING, Any

import torch

from sglang.srt.mem_cache.segmented.backing import (
    PASSED,
    Backing,
    BackingUnavailableError,
    CommittedRanges,
    Fence,
    RangeSet,
    check_range,
    tensor_bytes,
)
from sglang.srt.mem_cache.segmented.geometry import align_up

if TYPE_CHECKING:
    from sglang.srt.mem_cache.segmented.shared_budget import SharedBudget

__all__ = [
    "COMMIT_RESERVE_BYTES",
    "CpuBackingFactory",
    "CpuMmapBacking",
    "available_memory_bytes",
    "make_backing",
]

# Python's mmap module lacks these constants on some versions; the values are Linux ABI.
# MAP_NORESERVE is 0x40 on powerpc and 0x4000 on x86, arm, s390 and the asm-generic arches.
_MAP_NORESERVE: int = getattr(
    mmap, "MAP_NORESERVE", 0x40 if platform.machine().startswith("ppc") else 0x4000
)
_MADV_POPULATE_WRITE: int = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14
_MADV_NOHUGEPAGE: int | None = getattr(mmap, "MADV_NOHUGEPAGE", None)


# A commit is refused (MemoryError) rather than attempted when it would leave less than this
# much memory available: on Linux an over-commit is not an error but the OOM killer.
COMMIT_RESERVE_BYTES = 256 << 20


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cgroup_headroom() -> int | None:
    """Limit minus usage of this process's memory cgroup (v2 or v1), None if unlimited.

    Usage counts the page cache too (log files written, model files read); its inactive
    part is reclaimed before the OOM killer acts, so it is left out, as `docker stats`
    does."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            root, limit_name, usage_name, cache_key = (
                "/sys/fs/cgroup" + path,
                "memory.max",
                "memory.current",
                "inactive_file",
            )
        elif "memory" in controllers.split(","):
            root, limit_name, usage_name, cache_key = (
                "/sys/fs/cgroup/memory" + path,
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
                "total_inactive_file",
            )
        else:
            continue
        try:
            with open(f"{root}/{limit_name}") as f:
                limit_text = f.read().strip()
            with open(f"{root}/{usage_name}") as f:
                usage = int(f.read().strip())
            with open(f"{root}/memory.stat") as f:
                stat = dict(line.split() for line in f if line.strip())
        except (OSError, ValueError):
            continue
        if limit_text == "max" or int(limit_text) >= 1 << 60:
            continue
        return int(limit_text) - (usage - int(stat.get(cache_key, 0)))
    return None


def available_memory_bytes() -> int | None:
    """Memory a commit can still take: the kernel's MemAvailable, bounded by this
    process's memory cgroup (a container limit); None if neither can be read."""
    figures = [v for v in (_meminfo_available(), _cgroup_headroom()) if v is not None]
    return min(figures) if figures else None


class CpuMmapBacking(CommittedRanges):
    """Anonymous private ``MAP_NORESERVE`` mapping exposed zero-copy as a torch tensor.

    Reserving does not count against the commit limit under the default overcommit
    policy (``vm.overcommit_memory`` 0 or 1), so an 82 GB reservation works on a 24 GB
    machine. Under strict overcommit (mode 2) the kernel ignores ``MAP_NORESERVE`` and
    the reservation fails.

    ``release`` is ``MADV_DONTNEED``: RSS drops at once and the range reads back as
    zeros. ``commit`` is ``MADV_POPULATE_WRITE`` (Linux >= 5.14), falling back to
    touching one byte per OS page, so committed memory is really resident and a later
    kernel write cannot fault. A commit the machine or its memory cgroup cannot hold
    raises MemoryError before touching anything (populating it would summon the OOM
    killer instead of failing).
    """

    def __init__(
        self,
        nbytes: int,
        granularity: int | None = None,
        *,
        populate: bool | None = None,
        check_available: bool = True,
    ) -> None:
        page = mmap.PAGESIZE
        granularity = page if granularity is None else granularity
        if granularity <= 0 or granularity % page:
            raise ValueError(
                f"granularity {granularity} must be a positive multiple of the OS page size {page}"
            )
        if nbytes <= 0:
            raise ValueError(f"reservation size must be positive, got {nbytes} bytes")
        self.granularity: int = granularity
        self._reserved = align_up(nbytes, granularity)
        self._map: mmap.mmap | None = mmap.mmap(
            -1,
            self._reserved,
            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
        if _MADV_NOHUGEPAGE is not None:
            # With THP "always" a 4 KB commit could fault in 2 MB and a partial release would
            # only split the huge page, making committed_bytes disagree with RSS.
            try:
                self._map.madvise(_MADV_NOHUGEPAGE)
            except OSError:
                pass
        # torch keeps a reference to the mmap object for as long as any view lives, so the
        # mapping cannot be unmapped under a live tensor (see close()).
        self._base: torch.Tensor | None = torch.frombuffer(self._map, dtype=torch.uint8)
        self._committed = RangeSet()
        # None = probe MADV_POPULATE_WRITE on first commit; False forces the touch fallback.
        self._populate: bool | None = populate
        self.check_available: bool = check_available

    @property
    def uses_populate_write(self) -> bool | None:
        """Whether commits use MADV_POPULATE_WRITE (None until the first commit probes it)."""
        return self._populate

    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        base = self._live_base()
        nbytes = tensor_bytes(dtype, shape, self._reserved)
        return base[:nbytes].view(dtype).view(shape)

    def commit(self, offset: int, nbytes: int, *, unused: bool = False) -> None:
        self._check_range(offset, nbytes)
        already = self._committed.overlap(offset, offset + nbytes)
        if nbytes == 0 or already == nbytes:
            return
        self._check_available(nbytes - already)
        # Populating an already-resident page is harmless, so the whole range goes in one call.
        self._populate_range(offset, nbytes)
        self._committed.add(offset, offset + nbytes)

    def _check_available(self, nbytes: int) -> None:
        """Refuse a commit the machine (or container) cannot hold: populating it anyway
        would end in the OOM killer, not an error (another process may have taken the
        memory)."""
        if not self.check_available:
            return
        available = available_memory_bytes()
        if available is not None and nbytes > available - COMMIT_RESERVE_BYTES:
            raise MemoryError(
                f"cannot commit {nbytes} bytes: {max(available, 0)} bytes available, "
                f"{COMMIT_RESERVE_BYTES} kept in reserve"
            )

    def release(self, offset: int, nbytes: int, *, unused: bool = False) -> None:
        self._check_range(offset, nbytes)
        if nbytes == 0 or self._committed.overlap(offset, offset + nbytes) == 0:
            return
        assert self._map is not None
        # MADV_DONTNEED (not MADV_FREE): private anonymous pages are dropped at once and read
        # back as zeros, which the allocator relies on for stale-data-free reuse.
        self._map.madvise(mmap.MADV_DONTNEED, offset, nbytes)
        self._committed.remove(offset, offset + nbytes)

    def discard(self, offset: int, nbytes: int) -> None:
        """Drop whatever pages of a range are resident, committed explicitly or by first
        touch.

        For tables written in place (req_to_token) whose pages the kernel commits on
        write: `release` only acts on ranges `commit` accounted for.
        """
        self._check_range(offset, nbytes)
        if nbytes == 0:
            return
        assert self._map is not None
        self._map.madvise(mmap.MADV_DONTNEED, offset, nbytes)
        self._committed.remove(offset, offset + nbytes)

    def close(self) -> None:
        """Drop all physical memory and this object's references to the mapping.

        The mapping itself is unmapped when the last tensor view dies: calling
        ``mmap.close`` under a live view would leave it dangling and segfault on the
        next access.
        """
        if self._map is None:
            return
        self._map.madvise(mmap.MADV_DONTNEED)
        self._committed = RangeSet()
        self._base = None
        self._map = None

    def _live_base(self) -> torch.Tensor:
        if self._base is None:
            raise RuntimeError("backing is closed")
        return self._base

    def _check_range(self, offset: int, nbytes: int) -> None:
        if self._map is None:
            raise RuntimeError("backing is closed")
        check_range(offset, nbytes, self.granularity, self._reserved)

    def _populate_range(self, offset: int, nbytes: int) -> None:
        assert self._map is not None
        if self._populate is not False:
            try:
                self._madvise_retry(_MADV_POPULATE_WRITE, offset, nbytes)
                self._populate = True
                return
            except OSError as e:
                if e.errno == errno.ENOMEM or e.errno == errno.EFAULT:
                    raise MemoryError(
                        f"cannot commit {nbytes} bytes at offset {offset}: out of memory"
                    ) from e
                if e.errno != errno.EINVAL or self._populate:
                    raise
                # EINVAL on the first try: kernel older than 5.14, use the touch fallback.
                self._populate = False
        # Rewrite one byte per OS page with its own value: the write fault allocates the page
        # without changing contents. Only best effort under memory pressure (may OOM-kill).
        assert self._base is not None
        touched = self._base[offset : offset + nbytes : mmap.PAGESIZE]
        touched.copy_(touched.clone())

    def _madvise_retry(self, advice: int, offset: int, nbytes: int) -> None:
        assert self._map is not None
        for _ in range(100):
            try:
                self._map.madvise(advice, offset, nbytes)
                return
            except OSError as e:
                # POPULATE may be interrupted by a signal or transient contention; it is
                # idempotent, so retrying the whole range is safe.
                if e.errno not in (errno.EINTR, errno.EAGAIN):
                    raise
        self._map.madvise(advice, offset, nbytes)


class CpuBackingFactory:
    """`CpuMmapBacking` at OS-page granularity; nothing to keep ready (a commit is a
    populate of private pages). With a shared budget set, its backings reserve in it."""

    faults_in = True

    def __init__(self, granularity: int | None = None) -> None:
        self.granularity: int = granularity or mmap.PAGESIZE
        self.budget: SharedBudget | None = None

    def __call__(self, nbytes: int) -> Backing:
        backing = CpuMmapBacking(nbytes, self.granularity)
        return backing if self.budget is None else self.budget.reserving(backing)

    def keep_spares(self, nbytes: int, count: int) -> None:
        return None

    def trim_spares(self) -> int:
        return 0

    def ready_handles(self, nbytes: int, count: int) -> int:
        return count

    def fence(self, streams: tuple[Any, ...] = ()) -> Fence:
        return PASSED  # the CPU runs nothing behind the host's back


def make_backing(
    device: str | torch.device, nbytes: int, granularity: int | None
) -> Backing:
    """A CPU backing; a CUDA one needs the driver API
    (`cuda_backing.CudaBackingFactory`, built by the upstream layer from upstream's
    ``cuda_vmm_utils``)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return CpuMmapBacking(nbytes, granularity)
    if dev.type == "cuda":
        raise BackingUnavailableError(
            "a CUDA backing is built from the driver API: use "
            "cuda_backing.CudaBackingFactory (the server builds it on "
            "sglang.srt.utils.cuda_vmm_utils)"
        )
    raise BackingUnavailableError(
        f"--kv-alloc-mode segmented has no backing for device {str(dev)!r}; supported: cpu, cuda"
    )
