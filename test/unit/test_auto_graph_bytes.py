"""`auto`'s estimate of static mode's context-sized cuda-graph buffers, which the server
computes in-tree (`graph_layouts.context_sized_graph_bytes`, no planner), is the planner's
itemised list summed, for every backend, model kind and speculative setting the planner
prices: the two cannot drift apart unnoticed."""

from __future__ import annotations

import itertools
import types
from typing import Any

import pytest
from sglang.srt.mem_cache.segmented.graph_layouts import (
    AttentionGraphShape,
    context_sized_graph_bytes,
)

from sglang_kvalloc.core import planner
from sglang_kvalloc.core.planner.model import LLAMA4_ARCHS

# A hybrid sliding-window model (layer_types), beside the built-in configs.
HYBRID_SWA: dict[str, Any] = {
    "architectures": ["GptOssForCausalLM"],
    "num_hidden_layers": 4,
    "hidden_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "sliding_window": 128,
    "layer_types": ["sliding_attention", "full_attention"] * 2,
    "max_position_embeddings": 131072,
}
MODELS = {
    **{name: planner.load_model_config(name) for name in planner.builtin_model_names()},
    "hybrid-swa": HYBRID_SWA,
}
# (draft tokens, top-k, steps): none, EAGLE chain, EAGLE tree.
SPECULATIVE = [(0, 1, 0), (4, 1, 3), (8, 4, 5)]


def shape_of(spec: planner.ModelSpec, draft: int, topk: int, steps: int) -> AttentionGraphShape:
    """What the planner's model reading tells the backend's buffers (the server reads the
    same from the runner's configurator: `test_the_server_reads_the_shape_as_the_backends_do`)."""
    local = spec.architecture in LLAMA4_ARCHS and spec.sliding_window
    return AttentionGraphShape(
        mla=spec.attention == "mla",
        sliding_window=bool(spec.sliding_window),
        hybrid_swa=spec.is_hybrid_swa,
        local_attention_chunk=spec.sliding_window if local else None,
        draft_tokens=draft,
        topk=topk,
        draft_steps=steps,
    )


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("backend", ["triton", "flashinfer", "fa3", "torch_native"])
def test_the_servers_estimate_is_the_planners_sum(model: str, backend: str) -> None:
    spec = planner.model_spec_from_config(MODELS[model])
    checked = 0
    grid = itertools.product(SPECULATIVE, [1, 16], [4096, 10_000_000], [1, 160])
    for (draft, topk, steps), page, context, max_bs in grid:
        items = planner.cuda_graph_allocations(
            spec,
            backend=backend,
            max_bs=max_bs,
            context_len=context,
            page_size=page,
            speculative_draft_tokens=draft,
            speculative_topk=topk,
            speculative_num_steps=steps,
        )
        shape = shape_of(spec, draft, topk, steps)
        got = context_sized_graph_bytes(backend, max_bs, context, page, shape)
        assert got == sum(a.bytes for a in items), (draft, topk, steps, page, context, max_bs)
        checked += got > 0
    assert checked == (0 if backend == "torch_native" else 24)


def test_an_unknown_backend_is_named() -> None:
    with pytest.raises(ValueError, match="unknown attention backend 'nsa'"):
        context_sized_graph_bytes("nsa", 8, 4096, 1, AttentionGraphShape())
    with pytest.raises(planner.PlanError, match="unknown attention backend 'nsa'"):
        planner.cuda_graph_allocations(
            planner.model_spec_from_config(HYBRID_SWA),
            backend="nsa",
            max_bs=8,
            context_len=4096,
            page_size=1,
        )


def test_the_planners_decision_is_the_servers_rule() -> None:
    """The planner's `decide_auto` is the in-tree rule, its refusals a `PlanError`."""
    from sglang.srt.mem_cache.segmented import row_room

    args = dict(
        requested_context=10_000_000,
        model_max_context=10_000_000,
        max_context_one_request=1_000_000,
        context_scaled_bytes_static=8 << 30,
        budget_bytes=20 << 30,
    )
    assert planner.decide_auto(**args) == row_room.decide_auto(**args)
    assert planner.AUTO_STATIC_MAX_SHARE == row_room.CONTEXT_TABLES_MAX_SHARE
    with pytest.raises(planner.PlanError, match="budget_bytes must be positive"):
        planner.decide_auto(**{**args, "budget_bytes": 0})


def _configurator(window: int | None, **model: Any) -> types.SimpleNamespace:
    """A CUDA configurator as the runner makes it (what `cuda_graph_bytes` reads)."""
    fields = dict(
        attention_chunk_size=None,
        is_local_attention_model=False,
        is_encoder_decoder=False,
        is_hybrid_swa=False,
    )
    return types.SimpleNamespace(
        device="cuda:0",
        page_size=1,
        use_mla_backend=False,
        sliding_window_size=window,
        model_config=types.SimpleNamespace(**{**fields, **model}),
        server_args=None,
    )


def test_the_server_reads_the_shape_as_the_backends_do(monkeypatch: pytest.MonkeyPatch) -> None:
    """flashinfer makes a second wrapper where the runner's sliding window is set (Llama-4's
    chunk counts; a config's `sliding_window` the runner does not use does not) or for cross
    attention; fa3 adds Llama-4's local tables where the model is a local-attention one."""
    from sglang.srt.arg_groups import overrides
    from sglang.srt.mem_cache.segmented import auto_pools

    view = types.SimpleNamespace(
        speculative_num_draft_tokens=0,
        speculative_eagle_topk=1,
        speculative_num_steps=0,
        cuda_graph_config=types.SimpleNamespace(decode=types.SimpleNamespace(max_bs=8)),
        attention_backend="flashinfer",
    )
    monkeypatch.setattr(overrides, "resolving_view", lambda server_args: view)
    context = 1_000_000

    def flashinfer(wrappers: int) -> int:
        shape = AttentionGraphShape(sliding_window=wrappers == 2)
        return context_sized_graph_bytes("flashinfer", 8, context, 1, shape)

    assert auto_pools.cuda_graph_bytes(_configurator(None), context) == flashinfer(1)
    assert auto_pools.cuda_graph_bytes(_configurator(8192), context) == flashinfer(2)
    cross = _configurator(None, is_encoder_decoder=True)
    assert auto_pools.cuda_graph_bytes(cross, context) == flashinfer(2)
    view.attention_backend = "fa3"
    llama4 = _configurator(8192, attention_chunk_size=8192, is_local_attention_model=True)
    local = AttentionGraphShape(sliding_window=True, local_attention_chunk=8192)
    got = auto_pools.cuda_graph_bytes(llama4, context)
    assert got == context_sized_graph_bytes("fa3", 8, context, 1, local)
    assert got > context_sized_graph_bytes("fa3", 8, context, 1, AttentionGraphShape())
    view.cuda_graph_config = None  # no decode graphs configured: counted as 0, said so
    assert auto_pools.cuda_graph_bytes(llama4, context) == 0
