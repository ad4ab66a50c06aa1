"""One KV memory budget shared by every segmented server on a device: a ledger file in
``/dev/shm`` that each server reserves in before it commits memory and gives back to
after it releases some, so the servers on one GPU share what they commit instead of
splitting the device statically (``--mem-fraction-static``). Stdlib only.

The file is keyed by the user, the device (its UUID on CUDA, so processes with different
``CUDA_VISIBLE_DEVICES`` share it; a name on the CPU engine) and the budget's name. It
holds the total and one slot per server: pid and process start time (against pid reuse),
name, bytes committed, floor and limit, bytes wanted (a reservation refused: another
server should give way), heartbeat. Every change is made under ``flock``, which the
kernel drops when the holder dies; a slot whose process is gone is reaped by the next
change. A holder that is alive but stopped (SIGSTOP, a debugger) never hangs the others:
a lock not granted within ``LOCK_WAIT_S`` refuses the reservation, keeps a release to
settle at the next change, and readers read without it (the checksum catches a torn
read). The file is created owner-only; a file of another user, of another version, or
whose checksum fails is refused with one line, never trusted.

A server may reserve while the committed bytes of every server, plus what the others
still lack of their floors, stay within the total, and its own within its limit: each
keeps its floor however busy the others are. `LedgeredBacking` is a backing (upstream's
`Backing` protocol) whose commits are reserved in a budget first.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import stat
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from sglang.srt.mem_cache.segmented.backing import Backing

__all__ = [
    "DEFAULT_DIR",
    "BudgetError",
    "LedgerBusy",
    "LedgeredBacking",
    "SharedBudget",
    "Slot",
    "ledger_path",
    "list_ledgers",
    "locked_ledger",
    "read_ledger",
    "update_ledger",
]

VERSION = 1
MAGIC = "sglang-kvalloc-budget"
DEFAULT_DIR = Path("/dev/shm")
# How long a change waits for a ledger another process holds: a change takes microseconds, so
# a lock held longer is a holder that is stopped.
LOCK_WAIT_S = 1.0
JOIN_WAIT_S = 30.0


class BudgetError(RuntimeError):
    """A ledger that cannot be used: one line saying why and what to do."""


class LedgerBusy(BudgetError):
    """Another process has held the ledger's lock longer than the wait (it is stopped)."""


def _flock(fd: int, path: Path, *, exclusive: bool, wait: float) -> None:
    """``flock`` within ``wait`` seconds, else `LedgerBusy`."""
    operation = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    deadline = time.monotonic() + wait
    pause = 0.0005
    while True:
        try:
            fcntl.flock(fd, operation)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise LedgerBusy(
                    f"KV budget ledger {path} has been locked by another process for {wait:g} s "
                    "(is a server on it stopped?)"
                ) from None
            time.sleep(pause)
            pause = min(pause * 2, 0.02)


@dataclass
class Slot:
    """One server's row."""

    pid: int
    start: int  # the process's start time (clock ticks since boot), against pid reuse
    name: str
    committed: int = 0
    floor: int = 0
    limit: int = 0  # 0: the total
    wanted: int = 0  # bytes a refused reservation asked for (others give way)
    heartbeat: float = 0.0


@dataclass
class Ledger:
    """The file's content."""

    total: int
    slots: list[Slot] = field(default_factory=list)

    def committed(self) -> int:
        return sum(slot.committed for slot in self.slots)


def ledger_path(device_key: str, name: str, directory: Path = DEFAULT_DIR) -> Path:
    """The ledger of budget ``name`` on a device, for this user."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{device_key}-{name}")
    return directory / f"{MAGIC}-{os.getuid()}-{safe}.json"


def list_ledgers(directory: Path = DEFAULT_DIR) -> list[Path]:
    """This user's ledgers."""
    return sorted(directory.glob(f"{MAGIC}-{os.getuid()}-*.json"))


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc), None if it is gone."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields follow the last ')'.
    fields = stat_line[stat_line.rindex(")") + 2 :].split()
    return int(fields[19])  # field 22 of proc(5), counted from field 3


def _alive(slot: Slot) -> bool:
    return process_start(slot.pid) == slot.start


def _encode(ledger: Ledger) -> bytes:
    body = {
        "magic": MAGIC,
        "version": VERSION,
        "total": ledger.total,
        "slots": [asdict(slot) for slot in ledger.slots],
    }
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    checksum = zlib.crc32(text.encode())
    return json.dumps({"body": body, "crc32": checksum}, sort_keys=True).encode()


def _decode(raw: bytes, path: Path) -> Ledger:
    fix = f"remove {path} (no server may be using it) or use another --kv-budget"
    try:
        outer, _ = json.JSONDecoder().raw_decode(
            raw.decode()
        )  # a stale tail is ignored
        body = outer["body"]
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
        raise BudgetError(f"KV budget ledger {path} is not a ledger: {fix}") from None
    if outer.get("crc32") != zlib.crc32(text.encode()) or body.get("magic") != MAGIC:
        raise BudgetError(
            f"KV budget ledger {path} is corrupt (checksum mismatch): {fix}"
        )
    if body.get("version") != VERSION:
        raise BudgetError(
            f"KV budget ledger {path} is version {body.get('version')}, this build writes "
            f"{VERSION}: stop the servers using it, then {fix}"
        )
    return Ledger(
        total=int(body["total"]), slots=[Slot(**slot) for slot in body["slots"]]
    )


class SharedBudget:
    """This process's slot in a device's ledger (see the module docstring)."""

    def __init__(
        self,
        path: Path,
        *,
        total: int | None,
        name: str,
        floor: int = 0,
        limit: int = 0,
        pid: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.pid = os.getpid() if pid is None else pid
        start = process_start(self.pid)
        if start is None:
            raise BudgetError(
                f"process {self.pid} has no /proc entry: no KV budget ledger"
            )
        self.start = start
        self.clock = clock
        self._wanting = False
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._fd = fd
        info = os.fstat(fd)
        if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
            os.close(fd)
            raise BudgetError(
                f"KV budget ledger {path} is not this user's alone (owner {info.st_uid}, mode "
                f"{stat.S_IMODE(info.st_mode):o}): servers of different users do not share; "
                "use another --kv-budget"
            )
        self._pending_release = (
            0  # released while the ledger was busy: settled at the next change
        )
        self._waiting_seen, self._waiting_read_at = 0, -math.inf
        # Why the last reservation was refused, for the failed commit's message.
        self.refusal = ""
        with self._locked(create_total=total, wait=JOIN_WAIT_S) as ledger:
            if total is not None and ledger.total != total:
                raise BudgetError(
                    f"KV budget {name!r} on this device holds {ledger.total} bytes, asked "
                    f"{total}: leave --kv-budget-bytes out to join it, or use another --kv-budget"
                )
            if floor > ledger.total - sum(
                s.floor for s in ledger.slots if s.pid != self.pid
            ):
                raise BudgetError(
                    f"--kv-budget-floor {floor} does not fit budget {name!r}: the servers on it "
                    f"already keep {sum(s.floor for s in ledger.slots)} of {ledger.total} bytes"
                )
            ledger.slots = [s for s in ledger.slots if s.pid != self.pid]
            ledger.slots.append(
                Slot(
                    self.pid,
                    self.start,
                    name,
                    floor=floor,
                    limit=limit,
                    heartbeat=self.clock(),
                )
            )
            self.total = ledger.total

    @staticmethod
    def total_of(path: Path) -> int | None:
        """The total of the ledger at ``path``, None where there is none yet."""
        try:
            raw = _read_raw(path)
        except FileNotFoundError:
            return None
        return _decode(raw, path).total if raw else None

    @contextlib.contextmanager
    def _locked(
        self, create_total: int | None = None, wait: float = LOCK_WAIT_S
    ) -> Iterator[Ledger]:
        with locked_ledger(self._fd, self.path, create_total, wait=wait) as ledger:
            yield ledger

    def _mine(self, ledger: Ledger) -> Slot:
        """This server's slot, with what it released while the ledger was busy settled."""
        for slot in ledger.slots:
            if slot.pid == self.pid:
                slot.committed = max(0, slot.committed - self._pending_release)
                self._pending_release = 0
                return slot
        raise BudgetError(
            f"this server's slot left KV budget ledger {self.path} (reaped?)"
        )

    # -- the verbs ----------------------------------------------------------------------------

    def reserve(self, nbytes: int) -> bool:
        """Reserve before committing ``nbytes``; False (and ``nbytes`` marked wanted, so
        the others give way) where the budget, the others' floors or this server's limit
        say no, or another process holds the ledger (stopped) longer than
        ``LOCK_WAIT_S``."""
        self.refusal = f"the KV budget {self.path.name} is locked by a stopped process"
        with contextlib.suppress(LedgerBusy), self._locked() as ledger:
            mine = self._mine(ledger)
            mine.heartbeat = self.clock()
            others_short = sum(
                max(0, s.floor - s.committed) for s in ledger.slots if s is not mine
            )
            limit = mine.limit or ledger.total
            fits = ledger.committed() + others_short + nbytes <= ledger.total
            if fits and mine.committed + nbytes <= limit:
                mine.committed += nbytes
                mine.wanted = 0
                self._wanting = False
                return True
            mine.wanted = max(mine.wanted, nbytes)
            self._wanting = True
            self.refusal = (
                f"the KV budget {self.path.name} has no {nbytes} bytes left for this server "
                "(the others hold them and are asked to give way)"
                if mine.committed + nbytes <= limit
                else f"this server's limit in the KV budget {self.path.name} is reached"
            )
        return False

    def release(self, nbytes: int) -> None:
        """``nbytes`` were released (after the memory went back); settled at the next
        change where the ledger is busy."""
        self._pending_release += nbytes
        with contextlib.suppress(LedgerBusy), self._locked() as ledger:
            self._mine(ledger).heartbeat = self.clock()

    def others_waiting(self, max_age_s: float = 0.0) -> int:
        """Bytes other servers asked for and did not get. Read without the lock (a
        scheduler asks this in its loop, idle too: it must neither wait on nor hold the
        lock), at most every ``max_age_s`` seconds (the last answer in between); a torn
        read keeps it too."""
        now = time.monotonic()
        if now - self._waiting_read_at < max_age_s:
            return self._waiting_seen
        self._waiting_read_at = now
        with contextlib.suppress(BudgetError):
            raw = os.pread(self._fd, os.fstat(self._fd).st_size, 0)
            ledger = _decode(raw, self.path)
            self._waiting_seen = sum(
                s.wanted for s in ledger.slots if s.pid != self.pid
            )
        return self._waiting_seen

    def stop_wanting(self) -> None:
        """Nothing is waiting here any more (idle): a no-op unless a reservation was refused."""
        if not self._wanting:
            return
        with contextlib.suppress(LedgerBusy), self._locked() as ledger:
            self._mine(ledger).wanted = 0
            self._wanting = False  # else tried again at the next idle step

    def reserving(self, backing: Backing) -> LedgeredBacking:
        """``backing`` with every commit reserved in this budget first (`LedgeredBacking`)."""
        return LedgeredBacking(backing, self)

    def snapshot(self) -> dict[str, Any]:
        """The ledger as it stands: the total, what is committed, and every slot (read
        without a change, so a busy ledger does not hold up ``/server_info``)."""
        ledger, _ = read_ledger(self.path)
        return {
            "path": str(self.path),
            "total_bytes": ledger.total,
            "committed_bytes": ledger.committed(),
            "this_pid": self.pid,
            "slots": [asdict(s) for s in ledger.slots],
        }

    def close(self) -> None:
        """Leave the ledger (the slot goes; a dead process's goes at the next change)."""
        if self._fd < 0:
            return
        with contextlib.suppress(BudgetError), self._locked() as ledger:
            ledger.slots = [s for s in ledger.slots if s.pid != self.pid]
        os.close(self._fd)
        self._fd = -1


@contextlib.contextmanager
def locked_ledger(
    fd: int, path: Path, create_total: int | None = None, *, wait: float = LOCK_WAIT_S
) -> Iterator[Ledger]:
    """The ledger of the open file ``fd``, read and written back under its lock (the
    kernel drops it if this process dies; `LedgerBusy` where another holds it past
    ``wait``); the slots of dead processes reaped."""
    _flock(fd, path, exclusive=True, wait=wait)
    try:
        raw = os.pread(fd, os.fstat(fd).st_size, 0)
        if raw:
            ledger = _decode(raw, path)
        elif create_total is not None:
            ledger = Ledger(total=create_total)
        else:
            raise BudgetError(
                f"KV budget ledger {path} does not exist yet: the first server on it gives its "
                "size (--kv-budget-bytes)"
            )
        ledger.slots = [s for s in ledger.slots if _alive(s)]
        yield ledger
        # The new ledger over the old, then the tail cut: at every moment the file starts with
        # one whole ledger (a holder stopped or killed between the two leaves a stale tail,
        # which `_decode` ignores), so readers never need the lock.
        data = _encode(ledger)
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _read_raw(path: Path) -> bytes:
    """The file's bytes under a shared lock; where another process holds the lock past
    ``LOCK_WAIT_S`` (stopped), read without it until a read's checksum holds."""
    with open(path, "rb") as f:
        try:
            _flock(f.fileno(), path, exclusive=False, wait=LOCK_WAIT_S)
        except LedgerBusy:
            for _ in range(100):
                raw = os.pread(f.fileno(), os.fstat(f.fileno()).st_size, 0)
                with contextlib.suppress(BudgetError):
                    _decode(raw, path)
                    return raw
                time.sleep(0.01)
            raise
        try:
            return f.read()
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_ledger(path: Path) -> tuple[Ledger, set[int]]:
    """The ledger as it stands (nothing changed) and the pids of its slots whose process
    is gone."""
    ledger = _decode(_read_raw(path), path)
    return ledger, {slot.pid for slot in ledger.slots if not _alive(slot)}


def update_ledger(path: Path, change: Callable[[Ledger], str]) -> str:
    """Apply ``change`` to the ledger under its lock (dead slots reaped first); its answer."""
    fd = os.open(path, os.O_RDWR)
    try:
        with locked_ledger(fd, path) as ledger:
            return change(ledger)
    finally:
        os.close(fd)


class LedgeredBacking:
    """A backing whose commits are reserved in a `SharedBudget` before the memory is
    taken (a refusal is a failed commit: MemoryError, nothing changed) and given back to
    it after the memory went, so the ledger never counts less than the server holds."""

    def __init__(self, inner: Backing, budget: SharedBudget) -> None:
        self._inner = inner
        self._budget = budget
        self.granularity = inner.granularity

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @property
    def reserved_bytes(self) -> int:
        return self._inner.reserved_bytes

    @property
    def committed_bytes(self) -> int:
        return self._inner.committed_bytes

    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return self._inner.tensor(dtype, shape)

    def commit(self, offset: int, nbytes: int, *, unused: bool = False) -> None:
        inner = self._inner
        if nbytes <= 0 or inner.is_committed(offset, nbytes):
            return
        if not self._budget.reserve(nbytes):
            raise MemoryError(self._budget.refusal)
        before = inner.committed_bytes
        try:
            inner.commit(offset, nbytes, unused=unused)
        except BaseException:
            self._budget.release(nbytes)
            raise
        unused_part = nbytes - (inner.committed_bytes - before)
        if unused_part > 0:
            self._budget.release(unused_part)

    def release(self, offset: int, nbytes: int, *, unused: bool = False) -> None:
        before = self._inner.committed_bytes
        self._inner.release(offset, nbytes, unused=unused)
        self._budget.release(before - self._inner.committed_bytes)

    def close(self) -> None:
        before = self._inner.committed_bytes
        self._inner.close()
        self._budget.release(before)
