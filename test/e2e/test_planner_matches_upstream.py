"""The planner's static figures equal what upstream 0.5.23 really allocates (CPU engine)."""

from __future__ import annotations

from pathlib import Path

from conftest import ReferenceStatic
from sglang_kvalloc.core import planner
from sglang_kvalloc_harness.serving import LocalServer


def _planned(
    model: Path, context: int, max_total: int, page: int, max_reqs: int | None
) -> dict[str, int]:
    """The planner's figures for a static server with these flags."""
    spec = planner.model_spec_from_config(planner.load_model_config(model))
    cell = planner.kv_per_token(spec, attn_tp=1, kv_bytes=4)
    # A budget far above the cap: --max-total-tokens decides, as it does upstream here.
    pool = planner.pool_from_budget(10**12, cell, page_size=page, max_total_tokens=max_total)
    reqs = planner.resolve_max_num_reqs(
        pool.max_total_num_tokens, context, max_running_requests=max_reqs
    )
    table = planner.req_to_token_allocation(reqs, context, planner.req_to_token_extra())
    return {
        "token_capacity": pool.max_total_num_tokens,
        "max_running_requests": reqs,
        "req_to_token_bytes": table.bytes,
    }


FIGURES = ("token_capacity", "max_running_requests", "req_to_token_bytes")


def _reported(kv: dict) -> dict[str, int]:
    return {key: kv[key] for key in FIGURES}


def test_static_figures_match_the_shared_static_server(
    tiny_model: Path, reference_static: ReferenceStatic
) -> None:
    """4,096 context, 65,536 tokens, page 1, 4 request slots (conftest.REFERENCE_STATIC_ARGS)."""
    kv = reference_static.server.server_info()["internal_states"][0]["kv_alloc"]
    assert _reported(kv) == _planned(tiny_model, 4096, 65536, 1, 4)


def test_static_figures_match_upstream_at_page_16_with_upstreams_request_slots(
    tiny_model: Path,
) -> None:
    """16,384 context, 40,000 tokens, page 16, request slots as upstream resolves them."""
    args = ["--kv-alloc-mode", "static", "--context-length", "16384"]
    args += ["--max-total-tokens", "40000", "--page-size", "16", "--dtype", "float32"]
    with LocalServer(tiny_model, args=args) as server:
        kv = server.server_info()["internal_states"][0]["kv_alloc"]
    assert _reported(kv) == _planned(tiny_model, 16384, 40000, 16, None)
