"""The growth ceiling: segments withheld after a failed commit, and when to try again.

A commit that fails lowers the ceiling to the segment that failed: segments at or above
it are withheld, so the allocator offers fewer pages and the caller queues work as for a
full pool instead of being promised memory that cannot be had. The allocator retries
once ``retry_s`` has passed and lifts the ceiling when a commit succeeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["GrowthCeiling"]


class GrowthCeiling:
    """``ceiling`` (``num_segments`` while nothing is withheld), the failures so far and
    the clock of the last one."""

    def __init__(
        self, num_segments: int, retry_s: float, clock: Callable[[], float]
    ) -> None:
        if math.isnan(retry_s) or retry_s < 0:
            raise ValueError(f"retry_s must be >= 0, got {retry_s}")
        self.num_segments = num_segments
        self.retry_s = retry_s
        self.clock = clock
        self.ceiling = num_segments
        self.failures = 0
        self.last_error: str | None = None
        self._failed_at = 0.0
        # Memory occupation released (RL): everything withheld, no retry, until
        # `resume`.
        self.suspended = False

    @property
    def standing(self) -> bool:
        """Some segments are withheld."""
        return self.ceiling < self.num_segments

    def fail(self, seg: int) -> None:
        """The commit of ``seg`` failed (on some rank): withhold it and everything
        above."""
        self.ceiling = min(self.ceiling, seg)
        self._failed_at = self.clock()
        self.failures += 1

    def retry_due(self) -> bool:
        return not self.suspended and self.clock() - self._failed_at >= self.retry_s

    def suspend(self) -> None:
        """Every segment withheld, with no retry, until `resume`."""
        self.suspended = True
        self.ceiling = 0

    def resume(self) -> None:
        self.suspended = False
        self.lift()

    def lift(self) -> None:
        self.ceiling = self.num_segments

    def postpone(self) -> None:
        """A retry failed elsewhere: wait ``retry_s`` again."""
        self._failed_at = self.clock()
