"""What segmented mode's req_to_token rows may commit at run time where memory is
committed explicitly (a GPU), and how much of it the KV budget keeps free.

Standard library only: the capacity planner computes the same from outside a server.
"""

from __future__ import annotations

from dataclasses import dataclass

# The share of the KV budget that static mode's context-sized tables (req_to_token and
# the cuda-graph index buffers) may take: at an ordinary context (a 128K context on one
# GPU lands at ~2-4%) they cost little; above it they eat KV capacity, and at
# multi-million contexts they no longer fit at all. `auto` keeps static below it; the
# row room below keeps the KV pool at static's size up to it.
CONTEXT_TABLES_MAX_SHARE = 0.05


@dataclass(frozen=True)
class RowRoom:
    """What the rows may commit at run time, and how much of it the KV budget leaves
    free."""

    committed_at_most: int
    in_kv_budget: int


def req_to_token_bytes(max_running_requests: int, context_len: int, extra: int) -> int:
    """Upstream's `ReqToTokenPool` table: (size + 1) x (context_len + extra) int32."""
    return (max_running_requests + 1) * (context_len + extra) * 4


def req_to_token_room(
    *,
    max_running_requests: int,
    token_capacity: int,
    table_bytes: int,
    granularity: int,
    kv_pool_bytes: int,
) -> RowRoom:
    """Rows commit at most one granule per running request plus 4 B per token of the
    pool, and never more than the whole table (``table_bytes``, upstream's
    `ReqToTokenPool` at this context, rounded up to granules).

    Upstream pays for its whole table outside the KV budget (from the slack that
    --mem-fraction-static leaves). Segmented mode takes the same from there, up to
    `CONTEXT_TABLES_MAX_SHARE` of the KV pool: at an ordinary context the KV budget
    keeps nothing back and the pool holds what static's holds; past it (where static's
    table would be large, or not fit at all) the rest of the room comes out of the KV
    budget, so committing rows never eats the activations' slack."""
    whole = -(-table_bytes // granularity) * granularity
    room = min(whole, max_running_requests * granularity + 4 * token_capacity)
    outside = min(whole, int(CONTEXT_TABLES_MAX_SHARE * kv_pool_bytes))
    return RowRoom(committed_at_most=room, in_kv_budget=max(0, room - outside))


# `auto`'s choice between static and segmented, by the same share.
@dataclass(frozen=True)
class AutoDecision:
    """What `auto` does: the mode, the context it serves, and why."""

    mode: str
    effective_context: int
    clamped: bool
    reason: str


def decide_auto(
    *,
    requested_context: int | None,
    model_max_context: int,
    max_context_one_request: int,
    context_scaled_bytes_static: int,
    budget_bytes: int,
) -> AutoDecision:
    """Static or segmented, with the context clamped to what one request can hold.

    ``requested_context`` None is the model's own context. ``max_context_one_request``
    is the tokens the KV pool holds, page-rounded. ``context_scaled_bytes_static`` is
    what static mode allocates in proportion to the context at the context asked for;
    where the context is clamped it is scaled down in proportion (those tables are
    linear in the context up to a few tokens). Static is kept while that is at most
    `CONTEXT_TABLES_MAX_SHARE` of the KV budget."""
    if budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be positive (got {budget_bytes})")
    target = model_max_context if requested_context is None else requested_context
    if target <= 0:
        raise ValueError(f"context length must be positive (got {target})")
    if max_context_one_request <= 0:
        raise ValueError(
            f"the KV pool holds no full request ({max_context_one_request} tokens)"
        )
    clamped = target > max_context_one_request
    effective = max_context_one_request if clamped else target
    scaled = context_scaled_bytes_static
    if clamped:
        scaled = context_scaled_bytes_static * effective // target
    share = scaled / budget_bytes
    prefix = ""
    if clamped:
        prefix = (
            f"context {target} clamped to {effective}: one request can hold at most "
            f"{max_context_one_request} tokens on this device; "
        )
    limit = f"{CONTEXT_TABLES_MAX_SHARE:.0%}"
    if share <= CONTEXT_TABLES_MAX_SHARE:
        mode = "static"
        why = (
            f"static: context-scaled start-up allocations are {scaled} B, "
            f"{share:.1%} of the {budget_bytes} B KV budget (<= {limit})"
        )
    else:
        mode = "segmented"
        why = (
            f"segmented: context-scaled start-up allocations would be {scaled} B, "
            f"{share:.1%} of the {budget_bytes} B KV budget (> {limit})"
        )
    return AutoDecision(
        mode=mode, effective_context=effective, clamped=clamped, reason=prefix + why
    )
