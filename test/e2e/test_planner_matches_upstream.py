"""The planner's static figures equal what upstream 0.5.23 really allocates (CPU engine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sglang_kvalloc.core import planner
from sglang_kvalloc.serving import LocalServer

CASES = [
    # (context length, --max-total-tokens, --page-size, --max-running-requests)
    (2048, 16384, 1, None),
    (16384, 40000, 16, 8),
]


@pytest.mark.parametrize(("context", "max_total", "page", "max_reqs"), CASES)
def test_static_figures_match_upstream_tensors(
    tiny_model: Path, context: int, max_total: int, page: int, max_reqs: int | None
) -> None:
    args = ["--kv-alloc-mode", "static", "--context-length", str(context)]
    args += ["--max-total-tokens", str(max_total), "--page-size", str(page), "--dtype", "float32"]
    if max_reqs is not None:
        args += ["--max-running-requests", str(max_reqs)]
    with LocalServer(tiny_model, args=args) as server:
        kv = server.server_info()["internal_states"][0]["kv_alloc"]

    spec = planner.model_spec_from_config(planner.load_model_config(tiny_model))
    cell = planner.kv_per_token(spec, attn_tp=1, kv_bytes=4)
    # A budget far above the cap: --max-total-tokens decides, as it does upstream here.
    pool = planner.pool_from_budget(10**12, cell, page_size=page, max_total_tokens=max_total)
    reqs = planner.resolve_max_num_reqs(
        pool.max_total_num_tokens, context, max_running_requests=max_reqs
    )
    table = planner.req_to_token_allocation(reqs, context, planner.req_to_token_extra())

    assert kv["token_capacity"] == pool.max_total_num_tokens
    assert kv["max_running_requests"] == reqs
    assert kv["req_to_token_bytes"] == table.bytes
