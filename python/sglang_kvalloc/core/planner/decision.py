"""The auto decision: static or segmented, and the context one request can hold.

The rule is the server's own (`row_room.decide_auto`, in-tree, standard library only);
the planner raises its own error for input the rule refuses.
"""

from __future__ import annotations

from sglang_kvalloc.core.planner.common import PlanError
from sglang_kvalloc.core.planner.server_rules import row_room as _row_room

# Static is chosen by `auto` when the context-scaled start-up allocations (req_to_token and
# the cuda-graph index buffers) are at most this share of the KV budget.
AUTO_STATIC_MAX_SHARE: float = _row_room.CONTEXT_TABLES_MAX_SHARE
AutoDecision = _row_room.AutoDecision


def decide_auto(
    *,
    requested_context: int | None,
    model_max_context: int,
    max_context_one_request: int,
    context_scaled_bytes_static: int,
    budget_bytes: int,
) -> AutoDecision:
    """The server's `decide_auto`, with `PlanError` for what it refuses."""
    try:
        return _row_room.decide_auto(
            requested_context=requested_context,
            model_max_context=model_max_context,
            max_context_one_request=max_context_one_request,
            context_scaled_bytes_static=context_scaled_bytes_static,
            budget_bytes=budget_bytes,
        )
    except ValueError as exc:
        raise PlanError(str(exc)) from exc
