"""The debug ledger of pages handed out (upstream's ``SGLANG_DEBUG_MEMORY_POOL``).

With it a page handed out twice, freed twice or freed outside the committed pool raises
`PageAccountingError` at the call that does it. It costs a bool per page and a device
read per call, so it exists only under upstream's debug switch.
"""

from __future__ import annotations

import torch

__all__ = ["PageAccountingError", "PageLedger"]


class PageAccountingError(AssertionError, ValueError):
    """A debug check caught a bad free (double free, page outside the pool, ...).

    An AssertionError, as upstream's own allocator debug checks raise, and a ValueError,
    since the pages passed in are wrong."""


class PageLedger:
    """Which pages are handed out."""

    def __init__(self, cap_pages: int, device: torch.device) -> None:
        self.cap_pages = cap_pages
        self.allocated = torch.zeros(cap_pages, dtype=torch.bool, device=device)

    def taken(self, page_ids: torch.Tensor) -> None:
        """Raises:
        PageAccountingError: a page of ``page_ids`` is handed out already."""
        if page_ids.numel() == 0:
            return
        if bool(self.allocated[page_ids].any()):
            raise PageAccountingError("page handed out twice")
        self.allocated[page_ids] = True

    def freed(self, page_ids: torch.Tensor, first_page: int, limit: int) -> None:
        """Raises: PageAccountingError: a page outside ``[first_page, limit)`` (the
        committed segments), freed twice in the call, or not handed out."""
        lo, hi = int(page_ids.min()), int(page_ids.max())
        if lo < first_page or hi >= min(limit, self.cap_pages):
            raise PageAccountingError(
                f"freeing pages outside [{first_page}, {limit}): {lo}..{hi}"
            )
        if len(torch.unique(page_ids)) != len(page_ids):
            raise PageAccountingError("page freed twice in one call")
        if not bool(self.allocated[page_ids].all()):
            raise PageAccountingError(
                "freeing a page that is not allocated (double free?)"
            )
        self.allocated[page_ids] = False

    def used(self) -> int:
        return int(self.allocated.sum())

    def any_of(self, page_ids: torch.Tensor) -> bool:
        return bool(page_ids.numel()) and bool(self.allocated[page_ids].any())
