"""The auto decision: static or segmented, and the context one request can hold."""

from __future__ import annotations

from dataclasses import dataclass

from sglang_kvalloc.core.planner.common import PlanError
from sglang_kvalloc.core.planner.server_rules import row_room as _row_room

# Static is chosen by `auto` when the context-scaled start-up allocations (req_to_token and
# the cuda-graph index buffers) are at most this share of the KV budget (the server's rule,
# in-tree): below it static keeps upstream behaviour exactly at little cost; above it the
# tables eat KV capacity that segmented mode would leave for tokens.
AUTO_STATIC_MAX_SHARE: float = _row_room.CONTEXT_TABLES_MAX_SHARE


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
    """Pick static or segmented, clamping the context to what one request can hold.

    requested_context None means the model's own context (model_max_context), as upstream.
    max_context_one_request is the KV tokens the pool holds, page-rounded, already bounded by
    the model maximum unless the caller allows longer contexts. context_scaled_bytes_static
    is the sum of static mode's context-sized start-up allocations at the target context;
    when the context is clamped it is rescaled in proportion (they are linear in context up
    to a few tokens of headroom). Static is kept when that sum is at most
    AUTO_STATIC_MAX_SHARE of the KV budget.
    """
    if budget_bytes <= 0:
        raise PlanError(f"budget_bytes must be positive (got {budget_bytes})")
    target = model_max_context if requested_context is None else requested_context
    if target <= 0:
        raise PlanError(f"context length must be positive (got {target})")
    if max_context_one_request <= 0:
        raise PlanError(f"the KV pool holds no full request ({max_context_one_request} tokens)")
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
    if share <= AUTO_STATIC_MAX_SHARE:
        mode = "static"
        why = (
            f"static: context-scaled start-up allocations are {scaled} B, "
            f"{share:.1%} of the {budget_bytes} B KV budget (<= {AUTO_STATIC_MAX_SHARE:.0%})"
        )
    else:
        mode = "segmented"
        why = (
            f"segmented: context-scaled start-up allocations would be {scaled} B, "
            f"{share:.1%} of the {budget_bytes} B KV budget (> {AUTO_STATIC_MAX_SHARE:.0%})"
        )
    return AutoDecision(
        mode=mode, effective_context=effective, clamped=clamped, reason=prefix + why
    )
