"""What every part of the planner shares: byte units and the error it raises."""

from __future__ import annotations

GIB = 1 << 30
MIB = 1 << 20


class PlanError(ValueError):
    """Input the planner (or upstream) refuses; the message names the numbers."""
