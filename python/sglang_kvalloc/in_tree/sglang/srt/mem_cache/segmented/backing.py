"""Reserved address space whose physical memory is committed and released in ranges.

A `Backing` reserves ``reserved_bytes`` of contiguous address space up front and exposes
it as one tensor, so indices into it never move. Physical memory is committed (made
resident) and released range by range, in multiples of ``granularity`` bytes. A
`BackingFactory` makes the backings of one device (on CUDA: a virtual-memory reservation
with physical handles mapped per committed range).
"""

from __future__ import annotations

import bisect
import math
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = [
    "PASSED",
    "Backing",
    "BackingFactory",
    "BackingUnavailableError",
    "CommittedRanges",
    "Fence",
    "RangeSet",
    "check_range",
    "tensor_bytes",
]


class Fence(Protocol):
    """Marks the device work queued when it was made."""

    def done(self) -> bool:
        """Whether that work has finished (a query: never waits)."""
        ...


class BackingUnavailableError(RuntimeError):
    """No backing exists (yet) for the requested device."""


@runtime_checkable
class Backing(Protocol):
    """Reserved address space with physical memory committed/released in ranges."""

    granularity: int
    """Bytes; every commit/release offset and size is a multiple of this."""

    @property
    def reserved_bytes(self) -> int:
        """Size of the reservation (a multiple of ``granularity``)."""
        ...

    @property
    def committed_bytes(self) -> int:
        """Bytes currently committed (resident or guaranteed backable)."""
        ...

    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A contiguous tensor view starting at offset 0 of the reservation."""
        ...

    def commit(self, offset: int, nbytes: int, *, unused: bool = False) -> None:
        """Back ``[offset, offset + nbytes)`` with physical memory; idempotent.
        ``unused``: the caller knows no queued device work touches the range, so its
        mapping may change without waiting for the device."""
        ...

    def release(self, offset: int, nbytes: int, *, unused: bool = False) -> None:
        """Return ``[offset, offset + nbytes)`` to the system; idempotent (``unused``:
        as for `commit`)."""
        ...

    def close(self) -> None:
        """Release everything; the reservation goes away with the last tensor view."""
        ...


class RangeSet:
    """Disjoint, sorted half-open integer intervals; add/remove report the size changed.

    Segments are committed in large contiguous ranges, so an interval list stays tiny
    where a per-granule bitmap of an 80 GB reservation would cost tens of MB.
    """

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self.total: int = 0

    def __len__(self) -> int:
        return len(self._starts)

    def intervals(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=True))

    def overlap(self, lo: int, hi: int) -> int:
        """How much of ``[lo, hi)`` is covered."""
        covered = 0
        i = bisect.bisect_right(self._ends, lo)
        while i < len(self._starts) and self._starts[i] < hi:
            covered += min(hi, self._ends[i]) - max(lo, self._starts[i])
            i += 1
        return covered

    def add(self, lo: int, hi: int) -> int:
        """Cover ``[lo, hi)``; returns how much was newly covered."""
        if hi <= lo:
            return 0
        newly = (hi - lo) - self.overlap(lo, hi)
        # Every interval touching or overlapping [lo, hi) is merged into one.
        i = bisect.bisect_left(self._ends, lo)
        j = bisect.bisect_right(self._starts, hi)
        if i < j:
            lo = min(lo, self._starts[i])
            hi = max(hi, self._ends[j - 1])
        self._starts[i:j] = [lo]
        self._ends[i:j] = [hi]
        self.total += newly
        return newly

    def remove(self, lo: int, hi: int) -> int:
        """Uncover ``[lo, hi)``; returns how much was previously covered."""
        if hi <= lo:
            return 0
        removed = self.overlap(lo, hi)
        if removed == 0:
            return 0
        i = bisect.bisect_right(self._ends, lo)
        j = bisect.bisect_left(self._starts, hi)
        keep_s: list[int] = []
        keep_e: list[int] = []
        if self._starts[i] < lo:
            keep_s.append(self._starts[i])
            keep_e.append(lo)
        if self._ends[j - 1] > hi:
            keep_s.append(hi)
            keep_e.append(self._ends[j - 1])
        self._starts[i:j] = keep_s
        self._ends[i:j] = keep_e
        self.total -= removed
        return removed


def tensor_bytes(dtype: torch.dtype, shape: tuple[int, ...], reserved: int) -> int:
    """Bytes a tensor view of ``shape`` takes; ValueError if the reservation is
    smaller."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes > reserved:
        raise ValueError(
            f"tensor of shape {tuple(shape)} and dtype {dtype} needs {nbytes} bytes, "
            f"but only {reserved} are reserved"
        )
    return nbytes


def check_range(offset: int, nbytes: int, granularity: int, reserved: int) -> None:
    """A commit/release range must be granule-aligned and inside the reservation."""
    if offset < 0 or nbytes < 0 or offset % granularity or nbytes % granularity:
        raise ValueError(
            f"range offset={offset} nbytes={nbytes} is not aligned to granularity {granularity}"
        )
    if offset + nbytes > reserved:
        raise ValueError(
            f"range [{offset}, {offset + nbytes}) exceeds the reservation of {reserved} bytes"
        )


class CommittedRanges:
    """What every backing keeps of its commits: the reservation's size (``_reserved``)
    and the committed byte ranges (``_committed``); the accessors the `Backing` protocol
    reads."""

    _reserved: int
    _committed: RangeSet

    @property
    def reserved_bytes(self) -> int:
        return self._reserved

    @property
    def committed_bytes(self) -> int:
        return self._committed.total

    def committed_ranges(self) -> list[tuple[int, int]]:
        """Committed ``(start, end)`` byte ranges, sorted and disjoint."""
        return self._committed.intervals()

    def is_committed(self, offset: int, nbytes: int) -> bool:
        return self._committed.overlap(offset, offset + nbytes) == nbytes


class BackingFactory(Protocol):
    """Makes the backings of one device: ``factory(nbytes)``, all with
    ``granularity``."""

    granularity: int
    faults_in: bool
    """True where a first write commits memory (the CPU); False where nothing may be written
    before it is committed (a GPU): tables are then committed explicitly ahead of use."""

    def __call__(self, nbytes: int) -> Backing: ...

    def keep_spares(self, nbytes: int, count: int) -> None:
        """Keep physical memory for ``count`` commits of ``nbytes`` ready (may be a
        no-op)."""
        ...

    def trim_spares(self) -> int:
        """Give back whatever `keep_spares` holds; returns how many spares were
        dropped."""
        ...

    def ready_handles(self, nbytes: int, count: int) -> int:
        """Have memory for ``count`` commits of ``nbytes`` ready now where the device
        can; returns for how many it is (where commits need nothing ready:
        ``count``)."""
        ...

    def fence(self, streams: tuple[Any, ...] = ()) -> Fence:
        """A fence behind the device work queued so far (on the current stream and
        ``streams``): a range freed now may be unmapped without a wait once it is
        done."""
        ...


class _PassedFence:
    def done(self) -> bool:
        return True


PASSED = _PassedFence()
