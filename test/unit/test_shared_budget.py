"""The KV budget ledger several segmented servers share on one device (issue 37): processes
reserving and releasing at random never exceed the total, a killed holder is reaped, floors
and limits hold, and a ledger that is corrupt, of another version or readable by others is
refused in one line."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from sglang.srt.mem_cache.segmented.cpu_backing import CpuBackingFactory
from sglang.srt.mem_cache.segmented.settings import parse_bytes
from sglang.srt.mem_cache.segmented.shared_budget import (
    LOCK_WAIT_S,
    BudgetError,
    SharedBudget,
    ledger_path,
    read_ledger,
)

MIB = 1 << 20
TOTAL = 64 * MIB


def _worker(path: str, seed: int, ops: int, queue) -> None:  # type: ignore[no-untyped-def]
    budget = SharedBudget(Path(path), total=TOTAL, name=f"worker {seed}")
    rng = random.Random(seed)
    held = 0
    for _ in range(ops):
        if held and rng.random() < 0.45:
            n = rng.randrange(1, held + 1)
            budget.release(n)
            held -= n
        else:
            n = rng.randrange(1, 8) * MIB
            if budget.reserve(n):
                held += n
    mine = next(s for s in budget.snapshot()["slots"] if s["pid"] == os.getpid())
    queue.put((seed, held, mine["committed"]))
    if seed == 0:  # the one that is killed holds its memory and waits
        while not budget.reserve(4 * MIB):
            time.sleep(0.05)
        queue.put(("holding", os.getpid()))
        time.sleep(600)


def test_processes_at_random_never_exceed_the_total_and_a_killed_holder_is_reaped(
    tmp_path: Path,
) -> None:
    path = ledger_path("cpu-test", "random", tmp_path)
    SharedBudget(path, total=TOTAL, name="creator").close()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(path), seed, 300, queue)) for seed in range(4)]
    for proc in procs:
        proc.start()
    samples = 0
    finished: dict[int, tuple[int, int]] = {}
    holder = None
    deadline = time.monotonic() + 120
    while (len(finished) < 4 or holder is None) and time.monotonic() < deadline:
        ledger, _ = read_ledger(path)
        assert ledger.committed() <= ledger.total  # sampled all along
        samples += 1
        while not queue.empty():
            item = queue.get()
            if item[0] == "holding":
                holder = item[1]
            else:
                finished[item[0]] = item[1:]
    assert samples > 10 and len(finished) == 4 and holder is not None
    for held, committed in finished.values():
        assert held == committed  # each process's row is what it holds
    os.kill(holder, signal.SIGKILL)
    procs[0].join(timeout=30)
    for proc in procs[1:]:
        proc.join(timeout=30)
    held_by_dead = read_ledger(path)[0].committed()
    assert held_by_dead >= 4 * MIB  # the killed holder's row is still there ...
    survivor = SharedBudget(path, total=None, name="survivor")
    assert survivor.reserve(TOTAL)  # ... until the next change reaps it: all of it is free
    assert [s["name"] for s in survivor.snapshot()["slots"]] == ["survivor"]


def test_floors_and_limits_hold(tmp_path: Path) -> None:
    path = ledger_path("cpu-test", "floors", tmp_path)
    a = SharedBudget(path, total=100, name="a", floor=30, pid=os.getpid())
    b = SharedBudget(path, total=None, name="b", floor=20, limit=40, pid=os.getppid())
    assert not a.reserve(81)  # 20 of b's floor stay free for it
    assert a.reserve(80)
    assert b.reserve(20) and not b.reserve(1)  # the total
    a.release(50)
    assert not b.reserve(21)  # its limit: 40
    assert a.others_waiting() == 21  # b asked for 21 and did not get it: a should give way
    b.stop_wanting()  # b went idle
    assert a.others_waiting() == 0
    assert not b.reserve(21)
    assert b.reserve(20)  # granted: b no longer waits
    assert a.others_waiting() == 0
    with pytest.raises(BudgetError, match="floor"):
        SharedBudget(path, total=None, name="c", floor=60, pid=1)


def test_a_ledger_not_to_trust_is_refused_in_one_line(tmp_path: Path) -> None:
    path = ledger_path("cpu-test", "bad", tmp_path)
    SharedBudget(path, total=100, name="a").close()
    good = path.read_text()
    data = json.loads(good)
    data["body"]["total"] = 10**12  # edited by hand: the checksum no longer matches
    path.write_text(json.dumps(data))
    with pytest.raises(BudgetError) as error:
        SharedBudget(path, total=None, name="b")
    assert "corrupt" in str(error.value) and "\n" not in str(error.value)
    data = json.loads(good)
    data["body"]["version"] = 99
    from sglang.srt.mem_cache.segmented import shared_budget

    text = json.dumps(data["body"], sort_keys=True, separators=(",", ":"))
    data["crc32"] = shared_budget.zlib.crc32(text.encode())
    path.write_text(json.dumps(data))
    with pytest.raises(BudgetError, match="version 99"):
        SharedBudget(path, total=None, name="b")
    path.write_text(good)
    os.chmod(path, 0o644)  # readable by other users: not this user's alone
    with pytest.raises(BudgetError, match="not this user's alone"):
        SharedBudget(path, total=None, name="b")
    other = ledger_path("cpu-test", "new", tmp_path)
    SharedBudget(other, total=100, name="a").close()
    assert (other.stat().st_mode & 0o777) == 0o600  # created owner-only
    with pytest.raises(BudgetError, match="holds 100 bytes, asked 200"):
        SharedBudget(other, total=200, name="b")


def test_a_slot_of_a_reused_pid_is_reaped(tmp_path: Path) -> None:
    path = ledger_path("cpu-test", "reuse", tmp_path)
    budget = SharedBudget(path, total=100, name="a")
    assert budget.reserve(60)
    ledger = json.loads(path.read_text())
    # Same pid, another start time: a process that died and whose pid came back.
    from sglang.srt.mem_cache.segmented import shared_budget

    body = ledger["body"]
    body["slots"][0]["start"] -= 1
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    path.write_text(json.dumps({"body": body, "crc32": shared_budget.zlib.crc32(text.encode())}))
    other = SharedBudget(path, total=None, name="b", pid=os.getppid())
    assert other.reserve(100)  # the stale slot's 60 bytes are gone


def test_a_ledgered_backing_reserves_before_and_gives_back_after(tmp_path: Path) -> None:
    budget = SharedBudget(ledger_path("cpu-test", "backing", tmp_path), total=8 * MIB, name="a")
    factory = CpuBackingFactory()
    factory.budget = budget
    backing = factory(16 * MIB)
    granule = backing.granularity
    backing.commit(0, 4 * MIB)
    assert budget.snapshot()["committed_bytes"] == 4 * MIB == backing.committed_bytes
    backing.commit(0, 4 * MIB)  # already committed: nothing more reserved
    with pytest.raises(MemoryError, match="KV budget"):
        backing.commit(8 * MIB, 8 * MIB)  # more than the budget has left
    assert backing.committed_bytes == 4 * MIB  # nothing changed
    backing.release(0, granule)
    assert budget.snapshot()["committed_bytes"] == 4 * MIB - granule
    view = backing.tensor(torch.uint8, (granule,))
    del view
    backing.close()
    assert budget.snapshot()["committed_bytes"] == 0


def test_a_stopped_lock_holder_hangs_no_server_and_loses_no_release(tmp_path: Path) -> None:
    """A process stopped (SIGSTOP) while it holds the ledger's lock: a reservation is refused
    within the wait, a release is kept and settled at the next change, readers read without
    the lock; once the holder is gone everything goes through again."""
    path = ledger_path("cpu-test", "stopped", tmp_path)
    budget = SharedBudget(path, total=TOTAL, name="server")
    assert budget.reserve(8 * MIB)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "print('locked', flush=True); time.sleep(600)", str(path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        os.kill(holder.pid, signal.SIGSTOP)
        started = time.monotonic()
        assert not budget.reserve(MIB)  # refused, not hung
        budget.release(4 * MIB)  # kept
        assert budget.others_waiting() == 0
        with open(path, "ab") as f:  # stopped between writing a shorter ledger and the cut
            f.write(b'"slots": [{"stale tail')
        ledger, _ = read_ledger(path)  # read without the lock, the stale tail ignored
        assert ledger.committed() == 8 * MIB
        assert budget.snapshot()["committed_bytes"] == 8 * MIB
        assert time.monotonic() - started < 6 * LOCK_WAIT_S
    finally:
        holder.kill()
        holder.wait()
    assert budget.reserve(MIB)
    assert read_ledger(path)[0].committed() == 5 * MIB  # the kept release settled
    budget.close()


def test_bytes_are_parsed_in_powers_of_1024() -> None:
    assert parse_bytes("512") == 512
    assert parse_bytes("8G") == parse_bytes("8GiB") == 8 << 30
    assert parse_bytes("64m") == 64 << 20
    with pytest.raises(ValueError, match="8G or 512M"):
        parse_bytes("eight")
