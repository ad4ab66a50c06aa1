"""Two ranks in two processes over gloo (upstream's CPU group backend), as attention-TP ranks
share KV decisions. The CPU engine of 0.5.23 cannot serve --tp 2 here (one NUMA node, and
with SGLANG_CPU_OMP_THREADS_BIND its TP groups still build a CUDA-only PyNccl communicator),
so the agreement is tested in-process: the real allocators, a real collective, a commit that
fails on one rank only."""

from __future__ import annotations

import os
import socket
import traceback

import torch.multiprocessing as mp

RESULTS_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, port: int, queue) -> None:  # type: ignore[no-untyped-def]
    try:
        import torch
        import torch.distributed as dist

        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=rank, world_size=2)
        from sglang.srt.mem_cache.segmented import kv_allocators
        from sglang.srt.mem_cache.segmented.pool_config import make_rank_agreement
        from sglang.srt.mem_cache.segmented.runtime import RUNTIME
        from test_allocator_contracts import _buffers

        RUNTIME.settings.agree = make_rank_agreement(dist.group.WORLD)
        RUNTIME.settings.hold_off_s = 0.0
        kv = _buffers(64, 1, 4)  # 16 segments of 4 slots
        a = kv_allocators.SegmentedTokenToKVPoolAllocator(64, torch.int64, "cpu", kv, False)
        seg = a._segments
        seg.retry_s = 0.0
        buffers_commit = seg.on_commit
        failing = {"on": False}

        def on_commit(s: int) -> None:
            if rank == 1 and failing["on"]:
                raise MemoryError("taken by another process on rank 1")
            buffers_commit(s)

        seg.on_commit = on_commit
        seen: dict[str, object] = {}
        a.scheduler_step(10)
        x = a.alloc(10)
        failing["on"] = True
        a.scheduler_step(30)  # the commit fails on rank 1: both ranks withhold the same
        seen["withheld"] = a.withheld_size()
        seen["available"] = a.available_size()
        seen["refused"] = a.alloc(30) is None
        failing["on"] = False
        a.scheduler_step(30)  # the retry succeeds everywhere: the pool is whole again
        seen["withheld_after_retry"] = a.withheld_size()
        y = a.alloc(30)
        seen["slots"] = None if y is None else y.tolist()
        a.free(x)
        a.free(y)
        for _ in range(kv_allocators.SHRINK_CHECK_EVERY_ITERATIONS):  # on every rank alike
            a.scheduler_step(0)
        seen["committed_after_shrink"] = seg.committed_segments
        # RL's release and resume (issue 35), on every rank as upstream calls them: nothing
        # is agreed while released (no collective: a rank waiting on one would hang).
        seen["suspended_segments"] = a.suspend()
        for _ in range(kv_allocators.SHRINK_CHECK_EVERY_ITERATIONS):
            a.scheduler_step(20)
        seen["available_released"] = a.available_size()
        a.resume()
        a.scheduler_step(20)  # commit ahead again, agreed
        z = a.alloc(20)
        seen["slots_after_resume"] = None if z is None else z.tolist()
        seen["problems"] = seg.accounting_problems()
        queue.put((rank, seen))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, {"error": traceback.format_exc()}))


def test_two_ranks_commit_release_and_fail_alike() -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=RESULTS_TIMEOUT_S) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0, "a rank hung or crashed"
    for rank in (0, 1):
        assert "error" not in results[rank], results[rank]["error"]
    r0, r1 = results[0], results[1]
    assert r0 == r1  # every decision and every slot the same on both ranks
    assert r0["refused"] and r0["withheld"] > 0
    assert r0["withheld_after_retry"] == 0
    assert r0["slots"] is not None and len(r0["slots"]) == 30
    assert r0["committed_after_shrink"] == 1
    assert r0["suspended_segments"] == 1 and r0["available_released"] == 0
    assert r0["slots_after_resume"] == list(range(1, 21))
    assert r0["problems"] == []
