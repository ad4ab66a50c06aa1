"""Segmented mode on the other pool kinds, in-process against upstream's own classes.

Hybrid sliding-window (Llama-4, GPT-OSS, Gemma): upstream's `SWAKVPool` with both sub-pools
segmented, driven by upstream's `SWATokenToKVPoolAllocator` logic with segmented sub-allocators.
MLA (DeepSeek): upstream's `MLATokenToKVPool` with its latent buffers segmented. Each is held to
what upstream's own classes do on the same calls.
"""

from __future__ import annotations

import functools
import types

import pytest
import torch
from decisions import decide
from sglang.srt.mem_cache.allocator.swa import SWATokenToKVPoolAllocator
from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator
from sglang.srt.mem_cache.memory_pool import KVWriteLoc, MHATokenToKVPool, MLATokenToKVPool
from sglang.srt.mem_cache.segmented import kv_allocators, pool_kind
from sglang.srt.mem_cache.segmented.kv_pools import (
    SegmentedMHATokenToKVPool,
    SegmentedMLATokenToKVPool,
)
from sglang.srt.mem_cache.segmented.runtime import RUNTIME
from sglang.srt.mem_cache.segmented.swa_allocator import SegmentedSWATokenToKVPoolAllocator
from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool

from sglang_kvalloc.upstream import plugin

FULL_SIZE = 2048
SWA_SIZE = 1024
SEGMENT_TOKENS = 256


@pytest.fixture(autouse=True)
def _small_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(RUNTIME.settings, "segment_tokens", SEGMENT_TOKENS)
    monkeypatch.setattr(RUNTIME.settings, "hold_off_s", 0.0)


def swa_pool(pool_class: type, page_size: int) -> SWAKVPool:
    """Llama-4's pattern in miniature: three sliding-window layers per full one."""
    return SWAKVPool(
        size=FULL_SIZE,
        size_swa=SWA_SIZE,
        page_size=page_size,
        dtype=torch.float32,
        head_num=2,
        head_dim=32,
        swa_attention_layer_ids=[0, 1, 2, 4, 5, 6],
        full_attention_layer_ids=[3, 7],
        device="cpu",
        token_to_kv_pool_class=pool_class,
        enable_memory_saver=False,
    )


def swa_allocator(impl: str, page_size: int) -> SWATokenToKVPoolAllocator:
    if impl == "upstream":
        pool = swa_pool(MHATokenToKVPool, page_size)
        return SWATokenToKVPoolAllocator(
            FULL_SIZE, SWA_SIZE, page_size, torch.float32, "cpu", pool, False
        )
    pool = swa_pool(SegmentedMHATokenToKVPool, page_size)
    return SegmentedSWATokenToKVPoolAllocator(
        FULL_SIZE, SWA_SIZE, page_size, torch.float32, "cpu", pool, False
    )


def _trace(a: SWATokenToKVPoolAllocator) -> list[list[int]]:
    """Extends and decodes across pages, then the SWA side of the oldest tokens freed (what
    the SWA radix cache does once they leave the window), then a request freed whole."""
    ps = a.page_size
    outs: list[list[int]] = []
    pre = torch.tensor([0, 0])
    seq = torch.tensor([300, 500])
    last = torch.tensor([-1, -1])
    if ps == 1:
        first = a.alloc(800)
    else:
        first = a.alloc_extend(pre, pre.clone(), seq, seq.clone(), last, 800)
    assert first is not None
    outs.append(first.tolist())
    mapping = a.full_to_swa_index_mapping
    outs.append(mapping[first].tolist())
    req0, req1 = first[:300], first[300:]
    tails = [int(req0[-1]), int(req1[-1])]
    for step in range(3 * ps):
        if ps == 1:
            out = a.alloc(2)
        else:
            seq_now = torch.tensor([301 + step, 501 + step])
            out = a.alloc_decode(seq_now, seq_now.clone(), torch.tensor(tails))
        assert out is not None
        tails = out.tolist()
        outs.append(tails + mapping[out].tolist())
    # Out of the window: the first 256 tokens of request 1 lose their SWA slots only.
    a.free_swa(req1[:256])
    outs.append([a.full_available_size(), a.swa_available_size()])
    a.free(req0)
    outs.append([a.full_available_size(), a.swa_available_size(), a.available_size()])
    return outs


@pytest.mark.parametrize("page_size", [1, 16])
def test_swa_allocator_matches_upstream(page_size: int) -> None:
    """The same calls give the same full slots, the same SWA peers (upstream's full-to-SWA
    mapping) and the same free counts as upstream's allocator over upstream's pools."""
    expected = _trace(swa_allocator("upstream", page_size))
    got = _trace(swa_allocator("segmented", page_size))
    assert got == expected


@pytest.mark.parametrize("page_size", [1, 16])
def test_swa_sub_pools_commit_with_use_and_give_back(page_size: int) -> None:
    a = swa_allocator("segmented", page_size)
    pool = a.get_kvcache()
    full_buffers = pool.full_kv_pool.segmented_buffers
    swa_buffers = pool.swa_kv_pool.segmented_buffers
    start = (full_buffers.committed_bytes, swa_buffers.committed_bytes)
    assert full_buffers.committed_segments == swa_buffers.committed_segments == 1
    # Reserved to upstream's full size, on both sides.
    for sub, buffers in ((pool.full_kv_pool, full_buffers), (pool.swa_kv_pool, swa_buffers)):
        assert sub.k_buffer[0].shape[0] == sub.size + page_size
        assert buffers.geometry.cap_tokens == sub.size + page_size

    a.scheduler_step(900)  # the commit-ahead of one iteration
    if page_size == 1:
        out = a.alloc(900)
    else:  # upstream's SWA allocator allocates pages through alloc_extend only
        pre, seq, last = torch.tensor([0]), torch.tensor([900]), torch.tensor([-1])
        out = a.alloc_extend(pre, pre.clone(), seq, seq.clone(), last, 900)
    assert out is not None
    grown = (full_buffers.committed_bytes, swa_buffers.committed_bytes)
    assert grown[0] > start[0] and grown[1] > start[1]
    stats = a.segment_stats()
    assert stats["committed_bytes"] == sum(grown)
    assert stats["pools"]["swa"]["committed_bytes"] == grown[1]

    # The SWA radix cache frees out-of-window KV on the SWA side only: its segments drain.
    a.free_swa(out)
    assert a.maybe_shrink() > 0
    assert swa_buffers.committed_bytes == start[1]
    assert full_buffers.committed_bytes == grown[0]  # the full KV is still in use
    a.free_full(out)
    a.maybe_shrink()
    assert (full_buffers.committed_bytes, swa_buffers.committed_bytes) == start
    assert a.full_available_size() == FULL_SIZE and a.swa_available_size() == SWA_SIZE


def test_swa_kv_written_through_upstream_reads_back() -> None:
    """Writes through upstream's `SWAKVPool.set_kv_buffer` (full-to-SWA translation included)
    land in committed segmented memory and read back, on both sides."""
    a = swa_allocator("segmented", 1)
    pool = a.get_kvcache()
    a.scheduler_step(700)
    loc = a.alloc(700)
    k = torch.randn(700, 2, 32)
    v = torch.randn(700, 2, 32)
    # What the attention backend hands the pool: the full loc and its SWA translation.
    swa_loc = a.translate_loc_from_full_to_swa(loc)
    write_loc = KVWriteLoc(loc=loc, swa_loc=swa_loc)
    for layer_id in (0, 3):  # one sliding-window layer, one full one
        layer = types.SimpleNamespace(layer_id=layer_id, k_scale=None, v_scale=None)
        pool.set_kv_buffer(layer, write_loc, k, v)
    assert torch.equal(pool.swa_kv_pool.k_buffer[0][swa_loc], k)
    assert torch.equal(pool.full_kv_pool.v_buffer[0][loc], v)


def test_mla_pool_matches_upstream_and_commits_with_use() -> None:
    kwargs = dict(
        page_size=1,
        dtype=torch.bfloat16,
        kv_lora_rank=64,
        qk_rope_head_dim=16,
        layer_num=3,
        device="cpu",
        enable_memory_saver=False,
    )
    ours = SegmentedMLATokenToKVPool(FULL_SIZE, **kwargs)
    theirs = MLATokenToKVPool(FULL_SIZE, **kwargs)
    assert [b.shape for b in ours.kv_buffer] == [b.shape for b in theirs.kv_buffer]
    assert [b.dtype for b in ours.kv_buffer] == [b.dtype for b in theirs.kv_buffer]
    assert ours.get_kv_size_bytes() == theirs.get_kv_size_bytes()  # reserved = upstream's
    assert ours.data_ptrs.tolist() == [b.data_ptr() for b in ours.kv_buffer]
    buffers = ours.segmented_buffers
    start = buffers.committed_bytes
    assert start < theirs.get_kv_size_bytes() // 4

    a = kv_allocators.segmented_allocator_for(FULL_SIZE, 1, torch.bfloat16, "cpu", ours, False)
    a.scheduler_step(1500)
    loc = a.alloc(1500)
    assert loc is not None and buffers.committed_bytes > start
    latent = torch.randn(1500, 1, 80).to(torch.bfloat16)
    ours.kv_buffer[1][loc] = latent  # what upstream's set_mla_kv_buffer kernels write
    assert torch.equal(ours.get_key_buffer(1)[loc], latent)
    assert torch.equal(ours.get_value_buffer(1)[loc], latent[..., :64])
    a.free(loc)
    a.maybe_shrink()
    assert buffers.committed_bytes == start


def _configurator(**overrides: object) -> types.SimpleNamespace:
    """A configurator with upstream's own pool-class chooser (the platform's answer)."""
    hf_config = types.SimpleNamespace(architectures=["LlamaForCausalLM"])
    base = dict(
        model_config=types.SimpleNamespace(hf_config=hf_config),
        mambaish_config=None,
        use_mla_backend=False,
        is_hybrid_swa=False,
        kv_cache_dtype_str="auto",
        kv_cache_dtype=torch.float32,
        kv_shard_rank=None,
        device="cpu",
        server_args=types.SimpleNamespace(enable_unified_memory=False),
        _page_major_enabled=lambda: False,
    )
    base.update(overrides)
    configurator = types.SimpleNamespace(**base)
    configurator._resolve_kv_pool_class = functools.partial(
        KVCacheConfigurator._resolve_kv_pool_class, configurator
    )
    return configurator


@pytest.mark.parametrize(
    ("overrides", "kind", "on_demand"),
    [
        ({}, "mha", True),
        ({"is_hybrid_swa": True}, "hybrid_swa", True),
        ({"use_mla_backend": True}, "mla", True),
        ({"use_mla_backend": True, "is_hybrid_swa": True}, "hybrid_mla_swa", False),
        ({"mambaish_config": object()}, "hybrid_linear", False),
        ({"kv_cache_dtype_str": "mxfp8"}, "mha", False),
        ({"kv_shard_rank": 0}, "mha", False),
        ({"device": "npu"}, "mha", False),
        ({"_page_major_enabled": lambda: True}, "mha", False),
        ({"kv_cache_dtype": torch.float8_e4m3fn}, "mha", False),  # a quantizer on the CPU
        (
            {
                "is_hybrid_swa": True,
                "server_args": types.SimpleNamespace(enable_unified_memory=True),
            },
            "hybrid_swa",
            False,
        ),
    ],
)
def test_pool_kind_and_whether_kv_commits_on_demand(
    overrides: dict[str, object], kind: str, on_demand: bool
) -> None:
    got_kind, why_not = pool_kind.kv_pool_kind(_configurator(**overrides))
    assert got_kind == kind
    assert (why_not is None) == on_demand
    if why_not is not None:
        assert "\n" not in why_not and why_not


def test_deepseek_rope_cache_grows_lazily_to_upstreams_values() -> None:
    """DeepSeek's YaRN RoPE (its own forwards and incremental growth) grows with the positions
    in use, row for row what upstream's own cache of the full length holds."""
    from sglang.srt.layers.rotary_embedding.rope_variant import DeepseekScalingRotaryEmbedding
    from sglang.srt.mem_cache.segmented import rope

    def make(max_positions: int) -> DeepseekScalingRotaryEmbedding:
        return DeepseekScalingRotaryEmbedding(
            16, 16, max_positions, 10000, True, 4.0, torch.float32,
            beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0,
        )  # fmt: skip

    lazy, full = make(256), make(256)
    full._ensure_cos_sin_cache_length(5000)
    assert rope._can_grow_lazily(lazy)
    lazy._kvalloc_lazy_rope = True
    rope.before_rope_forward(lazy, torch.tensor([10, 3000]))
    rows = lazy.cos_sin_cache.shape[0]
    assert 3000 < rows < 5000
    assert torch.allclose(lazy.cos_sin_cache, full.cos_sin_cache[:rows])


def test_a_platform_pool_class_is_foreseen_by_the_decision(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A platform plugin's pool class (upstream's `current_platform.get_kv_pool_cls`) is seen
    when the mode is decided, so the decision says the KV pool is upstream's, and why."""
    from sglang.srt.platforms import current_platform

    class VendorPool(MLATokenToKVPool):
        pass

    monkeypatch.setattr(
        current_platform, "get_kv_pool_cls", lambda kind: VendorPool if kind == "mla" else None
    )
    kind, why_not = pool_kind.kv_pool_kind(_configurator(use_mla_backend=True))
    assert kind == "mla" and why_not is not None and "VendorPool" in why_not
    assert pool_kind.kv_pool_kind(_configurator()) == ("mha", None)


def test_build_hooks_swap_the_pool_class_and_refuse_one_not_foreseen() -> None:
    """The MLA and hybrid SWA build hooks hand upstream's builder the segmented class; a pool
    class the decision did not foresee is a one-line start-up error, never run half-way."""
    from sglang.srt.mem_cache.segmented import modes

    decide(modes.SEGMENTED, kind="mla")
    configurator = types.SimpleNamespace(is_draft_worker=False)

    def builder(self: object, **kwargs: object) -> object:
        return kwargs

    got = plugin.around_build_mla_kv_pool(builder, configurator, mla_pool_class=MLATokenToKVPool)
    assert got["mla_pool_class"] is SegmentedMLATokenToKVPool
    got = plugin.around_build_hybrid_swa_kv_pool(
        builder, configurator, mha_pool_class=MHATokenToKVPool
    )
    assert got["mha_pool_class"] is SegmentedMHATokenToKVPool

    class VendorPool(MLATokenToKVPool):
        pass

    with pytest.raises(modes.KvAllocModeError, match="VendorPool"):
        plugin.around_build_mla_kv_pool(builder, configurator, mla_pool_class=VendorPool)
    # Where the decision keeps upstream's pool, the hooks leave upstream's choice alone.
    decide(modes.SEGMENTED, kind="mla", kv_pool_problem="the VendorPool pool is not segmented")
    got = plugin.around_build_mla_kv_pool(builder, configurator, mla_pool_class=VendorPool)
    assert got["mla_pool_class"] is VendorPool


def test_fp8_kv_pool_stores_what_upstreams_stores() -> None:
    """`--kv-cache-dtype fp8_e4m3` (GPUs; upstream's CPU engine refuses it without Intel AMX):
    the segmented MHA pool has upstream's storage dtype and shapes, and what upstream's own
    `set_kv_buffer` writes into committed segments equals, byte for byte, what it writes into
    upstream's pool, and reads back through upstream's getters alike."""
    kwargs = dict(
        page_size=1,
        dtype=torch.float8_e4m3fn,
        head_num=2,
        head_dim=32,
        layer_num=2,
        device="cpu",
        enable_memory_saver=False,
    )
    ours = SegmentedMHATokenToKVPool(FULL_SIZE, **kwargs)
    theirs = MHATokenToKVPool(FULL_SIZE, **kwargs)
    assert ours.store_dtype == theirs.store_dtype == torch.uint8
    assert [(b.shape, b.dtype) for b in ours.k_buffer] == [
        (b.shape, b.dtype) for b in theirs.k_buffer
    ]
    assert ours.get_kv_size_bytes() == theirs.get_kv_size_bytes()
    a = kv_allocators.segmented_allocator_for(FULL_SIZE, 1, torch.float8_e4m3fn, "cpu", ours, False)
    start = ours.segmented_buffers.committed_bytes
    a.scheduler_step(700)
    loc = a.alloc(700)
    assert loc is not None and ours.segmented_buffers.committed_bytes > start
    k = torch.randn(700, 2, 32, dtype=torch.bfloat16)
    v = torch.randn(700, 2, 32, dtype=torch.bfloat16)
    layer = types.SimpleNamespace(layer_id=1, k_scale=None, v_scale=None)
    for pool in (ours, theirs):
        pool.set_kv_buffer(layer, loc, k.clone(), v.clone())
    assert torch.equal(ours.k_buffer[1][loc], theirs.k_buffer[1][loc])
    assert torch.equal(ours.v_buffer[1][loc], theirs.v_buffer[1][loc])
    assert ours.get_key_buffer(1).dtype == theirs.get_key_buffer(1).dtype
    read = ours.get_value_buffer(1)[loc].to(torch.float32)
    assert torch.equal(read, theirs.get_value_buffer(1)[loc].to(torch.float32))
    assert torch.allclose(read, v.to(torch.float32), rtol=0.13, atol=0.02)  # e4m3: 3 bits
