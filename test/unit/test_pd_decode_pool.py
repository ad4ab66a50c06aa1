"""PD disaggregation, stage 1 (issue 36): a decode server's req_to_token is lazy in segmented
mode, held to what upstream's `DecodeReqToTokenPool` does on the same calls."""

from __future__ import annotations

import types

import pytest
import torch
from decisions import decide
from fake_cuda import MIB, FakeDriver, FakeVmmApi
from sglang.srt.disaggregation.decode import DecodeReqToTokenPool
from sglang.srt.mem_cache.segmented import modes, refusals
from sglang.srt.mem_cache.segmented.cuda_backing import CudaBackingFactory, VmmDevice
from sglang.srt.mem_cache.segmented.lazy_decode_req_to_token import SegmentedDecodeReqToTokenPool
from sglang.srt.mem_cache.segmented.runtime import RUNTIME

from sglang_kvalloc.upstream import plugin

MB = 1 << 20
CONTEXT = 10_000_000  # a 10M-context decode server: 40 MB a row


class _Kv:
    """`req.kv` as upstream's: `holds_kv` follows the row."""

    def __init__(self) -> None:
        self.req_pool_idx: int | None = None
        self.kv_allocated_len = 0

    @property
    def holds_kv(self) -> bool:
        return self.req_pool_idx is not None


def _request() -> types.SimpleNamespace:
    return types.SimpleNamespace(kv=_Kv())


def test_the_lazy_decode_pool_does_what_upstreams_does_and_costs_what_rows_hold() -> None:
    size, pre_alloc = 4, 8
    lazy = SegmentedDecodeReqToTokenPool(size, CONTEXT, "cpu", False, pre_alloc)
    plain = DecodeReqToTokenPool(size, 64, "cpu", False, pre_alloc)  # upstream's, small
    assert lazy.req_to_token.shape == (size + pre_alloc + 1, CONTEXT)  # 520 MB, reserved
    assert lazy.req_to_token.dtype == torch.int32
    assert lazy.resident_bytes() < 1 * MB
    # Pre-allocation takes rows as upstream's does (head of the free list), frees append.
    reqs = [_request() for _ in range(5)]
    twins = [_request() for _ in range(5)]
    assert lazy.alloc(reqs[:3]) == plain.alloc(twins[:3]) == [1, 2, 3]
    lazy.free(reqs[1])
    plain.free(twins[1])
    assert lazy.alloc(reqs[3:]) == plain.alloc(twins[3:])
    assert lazy.free_slots == plain.free_slots and lazy.available_size() == plain.available_size()
    # upstream's idle leak identity: free rows + held rows == size + pre-allocation rows
    held = sum(r.kv.holds_kv for r in reqs)
    assert len(lazy.free_slots) + held == lazy.size + lazy.pre_alloc_size
    # What `_pre_alloc` writes lands; the row costs the pages written, and its free gives
    # them back.
    row = reqs[0].kv.req_pool_idx
    locs = torch.arange(1, 300_001, dtype=torch.int32)
    lazy.write((row, slice(0, len(locs))), locs)
    assert torch.equal(lazy.req_to_token[row, : len(locs)], locs)
    written = lazy.resident_bytes()
    assert 1 * MB < written < 3 * MB
    lazy.free(reqs[0])
    assert lazy.resident_bytes() < written - 1 * MB
    # Its whole pages read zero again (the page it shares with the row before keeps what
    # was written, as upstream's table keeps a freed row's values).
    assert int(lazy.req_to_token[row, 1024 : len(locs)].count_nonzero()) == 0
    lazy.clear()
    plain.clear()
    assert lazy.free_slots == plain.free_slots


def test_the_decode_pool_hook_builds_the_lazy_pool_only_in_segmented_mode(monkeypatch) -> None:
    from sglang.srt import runtime_context

    monkeypatch.setattr(
        runtime_context, "get_exec",
        lambda: types.SimpleNamespace(features=types.SimpleNamespace(enable_memory_saver=False)),
    )  # fmt: skip
    configurator = types.SimpleNamespace(
        is_draft_worker=False, device="cpu", model_config=types.SimpleNamespace(context_len=CONTEXT)
    )
    upstream = object()
    kwargs = dict(max_num_reqs=4, extra_max_context_len=0, pre_alloc_size=8)
    decide(modes.STATIC)
    assert (
        plugin.around_build_decode_req_pool(lambda c, **k: upstream, configurator, **kwargs)
        is upstream
    )
    decide(modes.SEGMENTED, kv_pool_problem="PD: the KV pool stays upstream's")
    pool = plugin.around_build_decode_req_pool(lambda c, **k: upstream, configurator, **kwargs)
    assert isinstance(pool, SegmentedDecodeReqToTokenPool)
    assert pool.req_to_token.shape == (13, CONTEXT) and pool.pre_alloc_size == 8


@pytest.mark.parametrize("pd_mode", ["prefill", "decode"])
def test_pd_runs_where_writes_commit_and_is_refused_where_rows_need_commits(pd_mode: str) -> None:
    server_args = types.SimpleNamespace(
        disaggregation_mode=pd_mode, enable_hierarchical_cache=False
    )
    configurator = types.SimpleNamespace(server_args=server_args, device="cuda:0")
    assert refusals.unsupported_feature(configurator, explicit_commits=False) is None
    refused = refusals.unsupported_feature(configurator, explicit_commits=True)
    assert refused is not None and "\n" not in refused
    assert f"--disaggregation-mode {pd_mode}" in refused and "--kv-alloc-mode static" in refused


def test_the_lazy_decode_pool_refuses_a_backing_that_commits_explicitly() -> None:
    driver = FakeDriver(capacity=256 * MIB)
    RUNTIME.backings = CudaBackingFactory(VmmDevice(FakeVmmApi(driver), 0, background_refill=False))
    with pytest.raises(ValueError, match="commits on write"):
        SegmentedDecodeReqToTokenPool(4, 1024, "cpu", False, 8)


@pytest.mark.parametrize(("pd_mode", "extra_rows"), [("null", 0), ("prefill", 0), ("decode", 8)])
def test_auto_counts_the_decode_sides_pre_allocation_rows(
    monkeypatch: pytest.MonkeyPatch, pd_mode: str, extra_rows: int
) -> None:
    """auto weighs what static would allocate: on a decode server, upstream's table has the
    pre-allocation rows too (`_build_req_to_token_pool`)."""
    from sglang.srt import runtime_context
    from sglang.srt.mem_cache import kv_cache_configurator
    from sglang.srt.mem_cache.segmented import auto_pools

    from sglang_kvalloc.core import planner

    disagg = types.SimpleNamespace(
        disaggregation_mode=pd_mode, enable_pd_role_switch=False,
        disaggregation_decode_extra_slots=8,
    )  # fmt: skip
    monkeypatch.setattr(runtime_context, "get_disagg", lambda: disagg)
    monkeypatch.setattr(kv_cache_configurator, "get_req_to_token_extra_context_len", lambda: 0)
    configurator = types.SimpleNamespace(device="cpu")
    config = types.SimpleNamespace(max_running_requests=4)
    got = auto_pools.context_scaled_static_bytes(configurator, config, CONTEXT)
    assert got == planner.req_to_token_allocation(4 + extra_rows, CONTEXT, 0).bytes
