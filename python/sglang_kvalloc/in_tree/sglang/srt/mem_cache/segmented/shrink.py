"""The shrink policy: trailing segments given back once seen entirely free for a
hold-off.

Each shrink check records when it first saw each trailing segment entirely free (the
clock is reset the moment one is seen in use). Only a trailing run of free segments can
go, so clocks are kept from the top down to the first segment in use. One below it may
keep a stale clock, but it is released only after every check of a whole hold-off has
walked through it and seen it free (each segment above had to be free that long first).
"""

from __future__ import annotations

import math

__all__ = ["HoldOffClocks"]


class HoldOffClocks:
    """When each segment was first seen entirely free (None: not seen so)."""

    def __init__(self, num_segments: int, hold_off_s: float) -> None:
        if math.isnan(hold_off_s) or hold_off_s < 0:
            raise ValueError(
                f"hold_off_s must be >= 0 (inf: never release), got {hold_off_s}"
            )
        self.hold_off_s = hold_off_s
        self.empty_since: list[float | None] = [None] * num_segments

    def reset(self) -> None:
        self.empty_since = [None] * len(self.empty_since)

    def in_use(self, seg: int) -> None:
        self.empty_since[seg] = None

    def observe(self, free_counts: list[int], usable: list[int], now: float) -> None:
        """A census of the committed segments (free pages of each), taken at ``now``."""
        for seg in range(len(free_counts) - 1, -1, -1):
            if free_counts[seg] == usable[seg]:
                if self.empty_since[seg] is None:
                    self.empty_since[seg] = now
            else:
                self.empty_since[seg] = None
                break

    def expired(self, seg: int, now: float, hold_off_s: float) -> bool:
        """``seg`` has been seen entirely free for at least ``hold_off_s``."""
        since = self.empty_since[seg]
        return since is not None and now - since >= hold_off_s
