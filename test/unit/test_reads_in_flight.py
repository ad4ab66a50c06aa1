"""No remap under a kernel in flight (issue 31, item 2), with the fake driver's stream.

fa3's metadata gathers ``req_to_token[rows, :max_seq_len_k]``: every row of a batch is read to
the longest, past its own committed prefix. With the overlap scheduler, iteration i + 1 admits
requests and grows rows (commits: unmap the scratch granule, map a real one) and releases
freed rows' granules while batch i's kernels are still queued. Here upstream's own metadata
builders run on CPU tensors over the fake CUDA backing in exactly that order, every op a
kernel on the fake's stream (`fake_cuda_kernels.QueuedKernels`), with mixed-length batches;
an unmap under an access in flight is the fake's illegal address.

fa3 is the builder that reads past a row's length. triton and flashinfer gather each row to
its own length (`KVIndexTranslator.pack_read_stream`, `create_flashinfer_kv_indices_triton`:
triton kernels, which do not run on the CPU), never past what the row committed for itself."""

from __future__ import annotations

import random
import types
from collections.abc import Callable

import pytest
import torch
from decisions import decide
from fake_cuda import MIB, FakeDriver, FakeIllegalAddress, FakeVmmApi
from fake_cuda_kernels import QueuedKernels
from sglang.srt.mem_cache.segmented import lazy_req_to_token, modes, scheduler_loop
from sglang.srt.mem_cache.segmented.cuda_backing import CudaBackingFactory, VmmDevice
from sglang.srt.mem_cache.segmented.runtime import RUNTIME

from sglang_kvalloc.upstream import plugin

GRANULE = 64 * 1024
CONTEXT = 50_000  # 200,000-byte rows: not granule-aligned, so neighbours share granules


class _Kv:
    def __init__(self) -> None:
        self.req_pool_idx: int | None = None

    @property
    def holds_kv(self) -> bool:
        return self.req_pool_idx is not None


def _req(n_tokens: int, decode: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        origin_input_ids=[0] * n_tokens, output_ids=[], extend_end=n_tokens, kv=_Kv(),
        remaining=decode,
    )  # fmt: skip


@pytest.fixture
def stream() -> FakeDriver:
    driver = FakeDriver(capacity=512 * MIB, min_granularity=GRANULE,
                        recommended_granularity=GRANULE)  # fmt: skip
    RUNTIME.backings = CudaBackingFactory(VmmDevice(FakeVmmApi(driver), 0, background_refill=False))
    return driver


def _fa3(pool: lazy_req_to_token.SegmentedReqToTokenPool) -> Callable[[object], None]:
    """Upstream's `FlashAttentionBackend.init_forward_metadata` over ``pool`` (the backend's
    own state stubbed: no scheduler metadata kernel, no sliding window, no speculation)."""
    from sglang.srt.layers.attention.flashattention_backend import FlashAttentionBackend

    backend = object.__new__(FlashAttentionBackend)
    backend.__dict__.update(
        req_to_token_pool=pool, req_to_token=pool.req_to_token, max_context_len=CONTEXT,
        page_size=1, topk=1, speculative_step_id=0, speculative_num_draft_tokens=0,
        speculative_num_steps=0, is_prefill_aware_swa=False, has_swa=False, use_mla=False,
        _get_scheduler_metadata=None, local_attn_builder=None, use_sliding_window_kv_pool=False,
        kv_index_translator=types.SimpleNamespace(is_translating=False), _kv_shard_pool=None,
    )  # fmt: skip
    return backend.init_forward_metadata


def _forward_batch(reqs: list, extend: bool) -> types.SimpleNamespace:
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    lens = [len(r.origin_input_ids) + len(r.output_ids) for r in reqs]
    seq_lens = torch.tensor(lens, dtype=torch.int64)
    new = [n if extend else 1 for n in lens]
    return types.SimpleNamespace(
        forward_mode=ForwardMode.EXTEND if extend else ForwardMode.DECODE,
        batch_size=len(reqs), seq_lens=seq_lens, seq_lens_cpu=seq_lens.clone(),
        req_pool_indices=torch.tensor([r.kv.req_pool_idx for r in reqs], dtype=torch.int64),
        spec_info=None, encoder_lens=None, extend_prefix_lens_cpu=[0] * len(reqs),
        extend_seq_lens_cpu=new, extend_seq_lens=torch.tensor(new, dtype=torch.int32),
    )  # fmt: skip


def _serve(
    driver: FakeDriver,
    build: Callable[[lazy_req_to_token.SegmentedReqToTokenPool], Callable],
    note_reads: bool,
    seed: int,
) -> dict[str, int]:
    """200 iterations of the overlap scheduler's order with one kernel queue: the top of the
    iteration (sync point, admission readied), admission (rows committed, then written by a
    kernel), decode rows grown, the batch's reads noted, the batch's metadata built (queued),
    then the previous batch's result processed (the host waited for it: its kernels finish)
    and its finished requests' rows freed."""
    pool = lazy_req_to_token.SegmentedReqToTokenPool(16, CONTEXT, "cpu", False)
    build = build(pool)
    rng = random.Random(seed)
    running: list = []
    waiting: list = []
    scheduler = types.SimpleNamespace(
        token_to_kv_pool_allocator=types.SimpleNamespace(), req_to_token_pool=pool,
        running_batch=types.SimpleNamespace(reqs=running, is_empty=lambda: not running),
        waiting_queue=waiting, chunked_req=None, page_size=1, chunked_prefill_size=-1,
    )  # fmt: skip
    previous: tuple[int, list] | None = None
    kernels = QueuedKernels(driver)
    for _ in range(200):
        if rng.random() < 0.6 and len(running) + len(waiting) < 14:
            long = rng.random() < 0.3
            waiting.append(_req(rng.randrange(30_000, 45_000) if long else rng.randrange(1, 600),
                                rng.randrange(1, 40)))  # fmt: skip
        scheduler_loop.before_get_next_batch_to_run(scheduler)
        admitted = waiting[: pool.available_size()]
        del waiting[: len(admitted)]
        if admitted:
            assert pool.alloc(admitted) is not None
            with kernels:  # write_req_to_token_pool: the new rows' prefixes
                for req in admitted:
                    n = len(req.origin_input_ids)
                    pool.req_to_token[req.kv.req_pool_idx, :n] = torch.arange(n, dtype=torch.int32)
        decoding = [r for r in running if r not in admitted]
        batch = types.SimpleNamespace(reqs=decoding, req_to_token_pool=pool)
        assert plugin.around_check_decode_mem(lambda b, s=None: True, batch)
        reqs = admitted or decoding
        if reqs:
            if note_reads:
                scheduler_loop.before_run_batch(scheduler, types.SimpleNamespace(reqs=reqs))
            with kernels:
                build(_forward_batch(reqs, extend=bool(admitted)))
        running.extend(admitted)
        if previous is not None:  # process batch i - 1's result: the host waited for it
            driver.finish(previous[0])
            for req in previous[1]:
                req.output_ids.append(1)
                req.remaining -= 1
                if req.remaining <= 0 and req in running:
                    running.remove(req)
                    pool.free(req)
        previous = (driver.launched, list(reqs)) if reqs else None
    commits = pool._row_commits
    return {
        "commits": commits.commits,
        "releases": commits.releases,
        "reach_waits": commits.reach_waits,
    }


@pytest.fixture(autouse=True)
def no_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler_loop, "decode_slots", lambda: (1, 2))
    monkeypatch.setattr(scheduler_loop, "_reads_whole_rows", lambda: False)
    decide(modes.SEGMENTED, explicit_commits=True, kv_pool_problem="rows only, here")


@pytest.mark.parametrize("seed", [3, 4])
def test_no_remap_lands_under_a_read_in_flight(stream: FakeDriver, seed: int) -> None:
    figures = _serve(stream, _fa3, note_reads=True, seed=seed)
    assert stream.faults == [], figures
    assert figures["commits"] > 50 and figures["releases"] > 10  # rows came and went
    # A commit waits for the device only where a queued kernel reads it: in this geometry
    # (rows of three granules, a third of the requests near the context) 11 of 200
    # iterations with fa3; the rest keep the overlap.
    assert figures["reach_waits"] <= 20, figures


def test_without_the_noted_reads_fa3s_gather_faults(stream: FakeDriver) -> None:
    """What the code did before the reads were noted: fa3 reads short rows to the batch's
    longest, and a granule there is remapped while that batch is in flight."""
    with pytest.raises(FakeIllegalAddress):
        _serve(stream, _fa3, note_reads=False, seed=3)
