"""Commit a 2-D table row by row, as far as each row is used: `req_to_token` on a GPU.

On the CPU the first write to a page commits it; a GPU does not fault memory in, so
every row's used prefix is committed before anything is written there. Rows are not
aligned to the backing's granularity (a row is ``context_len`` int32), so neighbouring
rows can share a granule: each granule is reference counted by the rows that reach into
it.

No device synchronize on the way (the scheduler's overlap keeps a batch in flight):

- With ``commits_unused``, a commit maps memory no queued kernel reads. Kernels read
  rows past their own length: fa3's metadata gathers ``req_to_token[rows, :longest]``,
  so a short row is read to the batch's longest. Before a batch is queued the caller
  says how far it reads each row (`note_reads`); granules that reach covers and no row
  holds (they could be remapped while the batch runs) are *exposed* until a fence made
  after the batch passes. A commit of an exposed granule waits for the device first
  (rare: a row growing into the reach of a longer neighbour), and an exposed granule is
  not released before its fence.
- A granule no row holds any more stays mapped until `flush`, where it retires behind a
  fence of the work queued so far; a later `flush` releases it once that fence has
  passed (the kernels that could read it are done). A row that reaches into a retiring
  granule takes it back, with nothing remapped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # stays torch-free: the planner's layouts import it
    from collections.abc import Callable

    from sglang.srt.mem_cache.segmented.backing import Backing, Fence

__all__ = ["RowCommits"]


class RowCommits:
    """Granule-level commits of a ``rows x row_bytes`` table over one backing."""

    def __init__(
        self,
        backing: Backing,
        rows: int,
        row_bytes: int,
        *,
        commits_unused: bool = False,
    ) -> None:
        self.backing = backing
        self.rows = rows
        self.row_bytes = row_bytes
        self.granularity = backing.granularity
        self.commits_unused = commits_unused
        # Per row: granules [lo, hi) it holds a reference to (hi == lo: none).
        self._held: list[tuple[int, int]] = [(0, 0)] * rows
        self._refs: dict[int, int] = {}
        self._pending: set[int] = set()
        self._retiring: dict[int, Fence] = {}
        # Granules a queued kernel may read that no row holds: the fence after that kernel
        # (None: not made yet; the next `flush` makes one).
        self._exposed: dict[int, Fence | None] = {}
        self.commits = 0
        self.releases = 0
        self.reach_waits = (
            0  # commits that waited for the device: a kernel could read there
        )

    def covered_items(self, row: int, item_bytes: int) -> int:
        """How many leading items of ``row`` are committed."""
        lo, hi = self._held[row]
        if hi == lo:
            return 0
        end = min(hi * self.granularity, (row + 1) * self.row_bytes)
        return (end - row * self.row_bytes) // item_bytes

    def ensure(self, row: int, nbytes: int) -> None:
        """Commit the first ``nbytes`` of ``row`` (MemoryError, nothing changed, if the
        device cannot)."""
        if nbytes <= 0:
            return
        nbytes = min(nbytes, self.row_bytes)
        g = self.granularity
        start = row * self.row_bytes
        lo = start // g
        hi = -(-(start + nbytes) // g)
        held_lo, held_hi = self._held[row]
        if held_hi > held_lo and hi <= held_hi:
            return
        first_new = held_hi if held_hi > held_lo else lo
        taken: list[int] = []
        try:
            for granule in range(first_new, hi):
                if self._refs.get(granule, 0) == 0:
                    self._map(granule)
                self._refs[granule] = self._refs.get(granule, 0) + 1
                taken.append(granule)
        except BaseException:
            for granule in taken:
                self._unref(granule)
            raise
        self._held[row] = (lo, hi)

    def unmapped(self, row: int, nbytes: int) -> list[int]:
        """Granules the first ``nbytes`` of ``row`` would commit now (none mapped
        there)."""
        g = self.granularity
        start = row * self.row_bytes
        end = start + min(nbytes, self.row_bytes)
        return [
            granule
            for granule in range(start // g, -(-end // g))
            if granule not in self._refs
            and granule not in self._pending
            and granule not in self._retiring
        ]

    def _map(self, granule: int) -> None:
        if granule in self._pending:
            self._pending.discard(granule)  # still mapped: reuse it
        elif self._retiring.pop(granule, None) is None:
            g = self.granularity
            span = getattr(self.backing, "remap_span", None)
            lo, hi = (
                span(granule * g, g)
                if span is not None
                else (granule * g, (granule + 1) * g)
            )
            read = any(self._read_in_flight(x) for x in range(lo // g, hi // g))
            self.backing.commit(
                granule * self.granularity,
                self.granularity,
                unused=self.commits_unused and not read,
            )
            self.commits += 1
            if read:  # the backing waited for the device: nothing queued reads any more
                self._exposed.clear()
                self.reach_waits += 1

    def note_reads(self, rows_and_bytes: list[tuple[int, int]]) -> None:
        """A kernel about to be queued reads the first ``nbytes`` of each row: the granules
        there that no row holds are exposed until a fence made after it has passed."""
        g = self.granularity
        for row, nbytes in rows_and_bytes:
            start = row * self.row_bytes
            end = start + min(nbytes, self.row_bytes)
            lo, hi = self._held[row]
            first = hi if hi > lo else start // g  # the row's own prefix is held
            for granule in range(first, -(-end // g)):
                if granule not in self._refs:
                    self._exposed[granule] = None

    def _read_in_flight(self, granule: int) -> bool:
        if granule not in self._exposed:
            return False
        fence = self._exposed[granule]
        if fence is not None and fence.done():
            del self._exposed[granule]
            return False
        return True

    def drop(self, row: int) -> None:
        """The row is free: its granules go once no row reaches into them (see
        `flush`)."""
        lo, hi = self._held[row]
        for granule in range(lo, hi):
            self._unref(granule)
        self._held[row] = (0, 0)

    def _unref(self, granule: int) -> None:
        refs = self._refs[granule] - 1
        if refs:
            self._refs[granule] = refs
        else:
            del self._refs[granule]
            self._pending.add(granule)

    def flush(self, fence: Callable[[], Fence] | None = None) -> int:
        """Release granules no row holds: with ``fence`` (it makes a fence of the work
        queued now, asked for only when a granule was freed or exposed since the last
        flush), those retired behind an earlier fence that has passed and read by no
        kernel in flight, and this call's free ones retire (and newly exposed ones wait)
        behind a new fence; without one (nothing can be reading), all of them now.
        Returns how many were released."""
        g = self.granularity
        if fence is None:
            free = sorted({*self._pending, *self._retiring})
            self._pending.clear()
            self._retiring.clear()
            for i, granule in enumerate(free):  # one device wait, before the first
                self.backing.release(granule * g, g, unused=i > 0)
            if free:
                self._exposed.clear()
            self.releases += len(free)
            return len(free)
        passed = sorted(
            granule
            for granule, f in self._retiring.items()
            if f.done() and not self._read_in_flight(granule)
        )
        for granule in passed:
            del self._retiring[granule]
            self.backing.release(granule * g, g, unused=True)
        unfenced = [granule for granule, f in self._exposed.items() if f is None]
        if self._pending or unfenced:
            behind = fence()
            for granule in self._pending:
                self._retiring[granule] = behind
            self._pending.clear()
            for granule in unfenced:
                self._exposed[granule] = behind
        self.releases += len(passed)
        return len(passed)

    @property
    def committed_granules(self) -> int:
        return len(self._refs) + len(self._pending) + len(self._retiring)

    @property
    def committed_bytes(self) -> int:
        return self.committed_granules * self.granularity
