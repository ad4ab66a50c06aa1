"""What a segmented allocator tells the operator: segments committed and released,
commits that came inside an allocation instead of ahead of the iteration, and commit
failures.

Growth and shrink lines are rate limited (the gauges carry every change); a failed
commit is a WARNING when failures start (then at most every `LOG_INTERVAL_S` while they
go on) and an INFO line once the capacity is back.
"""

from __future__ import annotations

import logging
import time

from sglang.srt.mem_cache.segmented.allocator import SegmentedPageAllocator
from sglang.srt.mem_cache.segmented.buffers import SegmentedBuffers

logger = logging.getLogger(__name__)

# Growth/shrink log lines: at most one per this many seconds (the gauges carry every change).
LOG_INTERVAL_S = 10.0


class RateLimitedLog:
    """INFO lines at most one per `LOG_INTERVAL_S`; the next one counts those left out."""

    def __init__(self) -> None:
        self._last = 0.0
        self.suppressed = 0

    def __call__(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last >= LOG_INTERVAL_S:
            if self.suppressed:
                msg += f" ({self.suppressed} earlier changes not logged)"
            logger.info(msg, *args)
            self._last = now
            self.suppressed = 0
        else:
            self.suppressed += 1


class SegmentEvents:
    """The commit and release callbacks of one allocator's segments (`on_commit`,
    `on_release` of `SegmentedPageAllocator`), which also commit and release the memory
    of ``buffers``, and the log of commit failures (`log_commit_failure`)."""

    def __init__(self, buffers: SegmentedBuffers, page_size: int) -> None:
        self.buffers = buffers
        self.page_size = page_size
        self.log = RateLimitedLog()
        # True while the scheduler commits ahead (and in the constructor's first commit).
        self.committing_ahead = True
        self.last_demand_tokens = 0
        self.mid_batch_commits = 0
        self._failures_logged = 0
        self._withheld_logged = False
        self._failure_logged_at = 0.0

    def on_commit(self, seg: int) -> None:
        buffers = self.buffers
        if not self.committing_ahead:
            # Inside an allocation: the scheduler's commit-ahead did not cover it. Should
            # this commit fail, upstream's allocation fails mid-batch; counted and said.
            self.mid_batch_commits += 1
            self.log(
                "KV segment %d committed inside an allocation, not ahead of the iteration "
                "(its demand estimate was %d tokens); %d such commits so far.",
                seg,
                self.last_demand_tokens,
                self.mid_batch_commits,
            )
        buffers.commit_segment(seg)
        self.log(
            "KV segments grew: segment %d committed; %d/%d committed, %.2f MB.",
            seg,
            buffers.committed_segments,
            buffers.geometry.num_segments,
            buffers.committed_bytes / 1e6,
        )

    def on_release(self, seg: int) -> None:
        buffers = self.buffers
        buffers.release_segment(seg)
        self.log(
            "KV segments shrank: segment %d released; %d/%d committed, %.2f MB.",
            seg,
            buffers.committed_segments,
            buffers.geometry.num_segments,
            buffers.committed_bytes / 1e6,
        )

    def on_suspend(self) -> None:
        released = self.buffers.release_all()
        logger.info(
            "KV segments released with the memory occupation: %d segments, the first too; "
            "%.2f MB committed.",
            released,
            self.buffers.committed_bytes / 1e6,
        )

    def log_commit_failure(self, seg: SegmentedPageAllocator) -> None:
        """WARNING when commits start failing (then at most every LOG_INTERVAL_S while
        they keep failing), INFO when the capacity is back."""
        withheld = seg.ceiling < seg.geometry.num_segments
        if not withheld:
            if self._withheld_logged:
                logger.info(
                    "KV segment commits succeed again: all %d tokens available.",
                    seg.capacity_pages * self.page_size,
                )
                self._withheld_logged = False
            return
        if seg.commit_failures == self._failures_logged:
            return
        now = time.monotonic()
        if self._withheld_logged and now - self._failure_logged_at < LOG_INTERVAL_S:
            return
        logger.warning(
            "KV segment commit failed (%s; %d failures so far): %d of %d tokens withheld until "
            "a commit succeeds (retried every %.1f s); requests queue as for a full pool.",
            seg.last_commit_error,
            seg.commit_failures,
            seg.withheld_pages() * self.page_size,
            seg.capacity_pages * self.page_size,
            seg.retry_s,
        )
        self._failures_logged = seg.commit_failures
        self._withheld_logged = True
        self._failure_logged_at = now
