"""Segmented `req_to_token`: upstream's `ReqToTokenPool` over a reservation, rows
committed as far as requests use them.

Upstream sizes this table (max_reqs + 1) x context_len int32 and zero-fills it: 82 GB at
10M context. Here it is a view of a reservation.

- Where a first write commits memory (the CPU), untouched pages read zero without being
  committed; a freed row's pages are given back.
- Where nothing may be written before it is committed (a GPU), each row's used prefix is
  committed before it is written: at admission (the prompt), and before every decode
  step (`check_decode_rows`, from upstream's own decode-memory check, so a row that
  cannot grow is retracted, or aborted when it is the last, exactly as upstream treats a
  full KV pool). Upstream raises when a row cannot be allocated, so admission never
  takes a row the device could not back: each iteration every rank agrees on the
  granules ready to be committed (`prepare_admission`), and each request admitted
  promises the granules its row needs (`admit_row`, exact: rows are handed out in the
  order admission counted them); a request past the budget waits in the queue. Row 0,
  which padded cuda-graph batches read, is committed and zeroed as upstream's
  `torch.zeros` table is. Freed rows' granules retire behind a fence and go at a later
  sync point, so no step waits for the device.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import mmap
from typing import TYPE_CHECKING

import numpy as np
import torch

from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
from sglang.srt.mem_cache.segmented.row_commits import RowCommits
from sglang.srt.mem_cache.segmented.runtime import RUNTIME, agree_alone

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.mem_cache.segmented.backing import BackingFactory

logger = logging.getLogger(__name__)


class ReservedTable:
    """A rows x columns int32 table over one reservation (upstream's req_to_token
    shape), and what both lazy pools do with its pages where a first write commits them
    (the CPU)."""

    def __init__(self, factory: BackingFactory, rows: int, columns: int) -> None:
        self.row_bytes = columns * 4
        self.backing = factory(rows * self.row_bytes)
        self.tensor = self.backing.tensor(torch.int32, (rows, columns))

    @property
    def reserved_bytes(self) -> int:
        return self.backing.reserved_bytes

    def release_rows(self, rows: Iterable[int]) -> None:
        """Give back the pages that lie wholly inside each of ``rows`` (they read zero again)."""
        gran = self.backing.granularity
        for row in rows:
            lo = -(-(row * self.row_bytes) // gran) * gran
            hi = ((row + 1) * self.row_bytes) // gran * gran
            if hi > lo:
                self.backing.discard(lo, hi - lo)

    def release_all(self) -> int:
        """Every page goes back; returns the bytes that were resident."""
        before = self.resident_bytes()
        self.backing.discard(0, self.backing.reserved_bytes)
        return before - self.resident_bytes()

    def resident_bytes(self) -> int:
        """Bytes of the table resident now (mincore(2))."""
        return _resident_bytes(
            self.tensor.data_ptr(), self.backing.reserved_bytes, mmap.PAGESIZE
        )


@dataclasses.dataclass
class _AdmissionBudget:
    """This iteration's admission: the granules every rank has ready (agreed), those
    promised so far (the continuing chunk's, then each admitted request's), and the rows
    handed out."""

    budget: int
    promised: set[int]
    new_rows: int = 0
    last: list[int] = dataclasses.field(default_factory=list)


class SegmentedReqToTokenPool(ReqToTokenPool):
    """req_to_token over reserved memory: only the rows and pages requests write are
    committed (see the module docstring)."""

    def __init__(
        self,
        size: int,
        max_context_len: int,
        device: str,
        enable_memory_saver: bool,
        *,
        agree: Callable[[int], int] = agree_alone,
    ) -> None:
        # Upstream's bookkeeping (free slots, generations) with a one-column table, then the
        # table itself from the reservation.
        super().__init__(size, 1, device, enable_memory_saver)
        rows = self._alloc_size
        self._factory = RUNTIME.backings
        self._table = ReservedTable(self._factory, rows, max_context_len)
        self._row_bytes = self._table.row_bytes
        self._backing = self._table.backing
        self.req_to_token = self._table.tensor
        self.max_context_len = max_context_len
        self._agree = agree
        # What this iteration's admission may commit (None: no limit of ours).
        self._admission: _AdmissionBudget | None = None
        self._short_of_rows = False
        self._padding_released = False
        self.row_commit_failures = 0
        self._row_commits: RowCommits | None = None
        worst = ""
        if not self._factory.faults_in:
            self._row_commits = RowCommits(
                self._backing, rows, self._row_bytes, commits_unused=True
            )
            granule = self._backing.granularity
            self._commit_padding_row()  # the padding row cuda-graph batches point at
            self._factory.keep_spares(granule, 2)
            worst = (
                f"; at most one {granule >> 20} MiB granule per running request "
                f"({size * granule / 1e9:.3f} GB for {size}) while requests stay under "
                f"{granule // 4} tokens"
            )
        logger.info(
            "Segmented req_to_token: %d x %d int32 reserved (%.3f GB address space), "
            "committed as rows are used%s.",
            rows,
            max_context_len,
            self._backing.reserved_bytes / 1e9,
            worst,
        )

    @property
    def commits_rows(self) -> bool:
        """Rows are committed explicitly (every backing but the CPU's)."""
        return self._row_commits is not None

    @property
    def reach_waits(self) -> int:
        """Row commits that waited for the device: a queued kernel could read there."""
        return 0 if self._row_commits is None else self._row_commits.reach_waits

    def alloc_rows(self, need_size: int) -> list[int] | None:
        """Upstream's rows from the tail of the free list, handed out last first: the
        i-th new request gets ``free_slots[-(i + 1)]``, the row `admit_row` counted for
        it."""
        rows = super().alloc_rows(need_size)
        return rows[::-1] if rows else rows

    def alloc(self, reqs: list[Req]) -> list[int] | None:
        new = [not req.kv.holds_kv for req in reqs]
        rows = super().alloc(reqs)
        if rows is None or self._row_commits is None:
            return rows
        if self._try_ensure(
            [(row, _target_len(req)) for row, req in zip(rows, reqs, strict=True)]
        ):
            return rows
        # Admission was prepared for (`prepare_admission`); the device still could not back
        # the rows. Nothing is kept: the new rows go back and upstream reports the pool
        # exhausted, as it does when its own pool is.
        self.row_commit_failures += 1
        taken = [row for row, fresh in zip(rows, new, strict=True) if fresh]
        for req, fresh in zip(reqs, new, strict=True):
            if fresh:
                req.kv.req_pool_idx = None
        self.free_rows(taken)
        return None

    def _try_ensure(self, rows_and_lengths: Sequence[tuple[int, int]]) -> bool:
        """Commit rows up to the given token counts; on a failure give back what freed
        rows hold (one device synchronize: a failure path) and try once more."""
        try:
            self.ensure_rows(rows_and_lengths)
            return True
        except MemoryError:
            self.release_free_rows_now()
        try:
            self.ensure_rows(rows_and_lengths)
            return True
        except MemoryError as exc:
            logger.warning("req_to_token rows could not be committed: %s", exc)
            return False

    def ensure_rows(self, rows_and_lengths: Sequence[tuple[int, int]]) -> None:
        """Commit rows up to the given token counts (a no-op on the CPU); MemoryError if
        the device cannot (rows committed so far stay)."""
        commits = self._row_commits
        if commits is None:
            return
        for row, length in rows_and_lengths:
            commits.ensure(row, min(length, self.max_context_len) * 4)

    def rows_cover(self, rows_and_lengths: Sequence[tuple[int, int]]) -> bool:
        """Whether every row is committed up to its token count (host arithmetic only)."""
        commits = self._row_commits
        if commits is None:
            return True
        return all(
            commits.covered_items(row, 4) >= min(length, self.max_context_len)
            for row, length in rows_and_lengths
        )

    def check_decode_rows(self, rows_and_lengths: Sequence[tuple[int, int]]) -> bool:
        """Before a decode step: every row covers the positions the step writes. Commits
        what is missing; the outcome is agreed by every rank sharing these rows (they
        attempt the same commits, so only the outcome can differ)."""
        if self.rows_cover(rows_and_lengths):
            return True
        ok = self._try_ensure(rows_and_lengths)
        if not ok:
            self.row_commit_failures += 1
        return bool(self._agree(int(ok)))

    def prepare_admission(
        self, held: Sequence[tuple[int, int]], lengths: Sequence[int]
    ) -> None:
        """Top of an iteration (every rank together): ``held`` are rows that grow in
        this iteration's admission (a continuing chunk: row and target length),
        ``lengths`` the target lengths of the requests it may admit, in queue order.
        Handles are made ready for the granules they would commit, and every rank agrees
        on how many are ready: the budget `admit_row` holds admission to."""
        commits = self._row_commits
        if commits is None:
            return
        promised: set[int] = set()
        for row, n in held:
            promised.update(commits.unmapped(row, self._bytes(n)))
        if not held and not lengths:  # the same on every rank: nothing to admit
            self._admission = _AdmissionBudget(0, promised)
            return
        wanted = set(promised)
        free = self.free_slots
        for i, n in enumerate(lengths[: min(len(free), 1024)]):
            wanted.update(commits.unmapped(free[-(i + 1)], self._bytes(n)))
        ready = self._factory.ready_handles(self._backing.granularity, len(wanted))
        budget = self._agree(ready)
        self._admission = _AdmissionBudget(budget, promised)
        short = budget < len(wanted)
        if short and not self._short_of_rows:
            logger.warning(
                "req_to_token rows for the queued requests cannot all be committed (%d of %d "
                "granules ready): admission takes what the ready ones back until memory comes "
                "back.",
                budget,
                len(wanted),
            )
        elif self._short_of_rows and not short:
            logger.info("req_to_token rows can be committed again: admission resumes.")
        self._short_of_rows = short

    def admit_row(self, length: int) -> bool:
        """Admission is about to take a new row for a request of ``length`` positions:
        promise the granules that row would commit, or say no (the request waits in the
        queue) when the iteration's budget cannot back them."""
        budget = self._admission
        commits = self._row_commits
        if budget is None or commits is None or budget.new_rows >= len(self.free_slots):
            return True
        row = self.free_slots[-(budget.new_rows + 1)]
        need = [
            g
            for g in commits.unmapped(row, self._bytes(length))
            if g not in budget.promised
        ]
        if len(budget.promised) + len(need) > budget.budget:
            return False
        budget.promised.update(need)
        budget.new_rows += 1
        budget.last = need
        return True

    def unadmit_row(self) -> None:
        """The request `admit_row` last said yes to was not admitted after all."""
        budget = self._admission
        if budget is not None and budget.new_rows:
            budget.promised.difference_update(budget.last)
            budget.new_rows -= 1
            budget.last = []

    def _bytes(self, length: int) -> int:
        return min(length, self.max_context_len) * 4

    def note_reads(self, rows_and_lengths: Sequence[tuple[int, int]]) -> None:
        """Before a batch is queued: how many positions of each row its kernels may read
        (a GPU; see `RowCommits.note_reads`)."""
        if self._row_commits is not None:
            self._row_commits.note_reads(
                [(row, min(n, self.max_context_len) * 4) for row, n in rows_and_lengths]
            )

    def sync_point(self, streams: tuple[object, ...] = ()) -> None:
        """At the top of a scheduler iteration: release the granules of rows freed
        earlier whose readers have finished; this iteration's free ones retire behind a
        fence."""
        if self._row_commits is not None:
            self._row_commits.flush(lambda: self._factory.fence(streams))

    def release_all(self) -> int:
        """RL's memory release (no row is in use): every granule goes back, the padding
        row's too (`restore_padding_row` brings it back before the next batch). Returns
        the bytes."""
        if self._row_commits is not None:
            before = self.resident_bytes()
            self._row_commits.drop(0)
            self._row_commits.flush()  # one device wait, before the first release
            self._padding_released = True
            return before - self.resident_bytes()
        return self._table.release_all()

    def restore_padding_row(self) -> None:
        """Row 0, which padded cuda-graph batches read, committed and zeroed again."""
        if self._row_commits is not None and self._padding_released:
            self._commit_padding_row()
            self._padding_released = False

    def _commit_padding_row(self) -> None:
        assert self._row_commits is not None
        self._row_commits.ensure(0, 4)
        self.req_to_token[
            0, : min(self.max_context_len, self._backing.granularity // 4)
        ].zero_()

    def release_free_rows_now(self) -> int:
        """Release every granule no row holds, waiting for the device first (idle, or a
        failed commit)."""
        if self._row_commits is None:
            return 0
        return self._row_commits.flush()

    def _release_rows(self, indices: list[int]) -> None:
        if self._row_commits is not None:
            for row in indices:
                self._row_commits.drop(row)
            return
        self._table.release_rows(indices)

    def free_rows(self, indices: list[int]) -> None:
        super().free_rows(indices)
        self._release_rows(list(indices))

    def clear(self) -> None:
        super().clear()
        if self._row_commits is not None:
            for row in range(1, self._alloc_size):
                self._row_commits.drop(row)

    def committed_bytes(self) -> int | None:
        """Committed explicitly (GPU); None where the kernel commits on write (CPU)."""
        return None if self._row_commits is None else self._row_commits.committed_bytes

    def resident_bytes(self) -> int:
        """Bytes of this table resident (pages written since their last release on the
        CPU, committed granules on a GPU)."""
        if self._row_commits is not None:
            return self._row_commits.committed_bytes
        return self._table.resident_bytes()


def _target_len(req: Req) -> int:
    """Positions of the request's row written by its next extend (and one decode step)."""
    extend_end = getattr(req, "extend_end", None)
    length = len(req.origin_input_ids) + len(req.output_ids)
    if isinstance(extend_end, int):
        length = max(length, extend_end)
    return length + 1


def _resident_bytes(addr: int, nbytes: int, page: int) -> int:
    """mincore(2) over a range: how much of it is resident."""
    libc = ctypes.CDLL(None, use_errno=True)
    npages = (nbytes + page - 1) // page
    vec = (ctypes.c_ubyte * npages)()
    if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(nbytes), vec) != 0:
        return -1
    return int((np.frombuffer(vec, dtype=np.uint8) & 1).sum()) * page
