"""The sorted list of free committed pages, and the frees staged for it.

Allocation takes the lowest ids off the front of a sorted int64 tensor (upstream's two
slices). Frees are staged in O(1) and merged into the list when an allocation runs short
or at a shrink check (upstream's ``need_sort``), or merged at once where staging is off.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["FreeList", "merge_sorted"]


def merge_sorted(sorted_ids: torch.Tensor, new_ids: torch.Tensor) -> torch.Tensor:
    """Merge ``new_ids`` (any order) into ascending ``sorted_ids``; ids must be
    disjoint.

    On the CPU numpy's stable sort (timsort) finds the sorted list and the ascending
    runs that freed requests' slots form, and merges them in one pass, single-threaded;
    on a GPU integer scatters place every id, so nothing waits for the device.
    """
    if new_ids.numel() == 0:
        return sorted_ids
    if sorted_ids.device.type == "cpu" and new_ids.device.type == "cpu":
        merged = np.concatenate((sorted_ids.numpy(), new_ids.numpy()))
        merged.sort(kind="stable")
        return torch.from_numpy(merged)
    new_ids, _ = torch.sort(new_ids)
    if sorted_ids.numel() == 0:
        return new_ids
    # Final position of every id: ids before it in its own list plus ids before it in
    # the other. Integer scatters only, so on a GPU nothing waits for the device.
    pos_new = torch.searchsorted(sorted_ids, new_ids) + torch.arange(
        new_ids.numel(), device=new_ids.device
    )
    pos_old = torch.searchsorted(new_ids, sorted_ids) + torch.arange(
        sorted_ids.numel(), device=sorted_ids.device
    )
    out = torch.empty(
        sorted_ids.numel() + new_ids.numel(), dtype=torch.int64, device=pos_new.device
    )
    out[pos_new] = new_ids
    out[pos_old] = sorted_ids
    return out


class FreeList:
    """Free pages of the committed segments: ``pages`` (sorted, unique int64) and the
    staged frees not merged into it yet.

    Contract: a free page is in exactly one of them; pages of a new top segment lie
    above every free page (`append_top`); once merged, the top segment's free pages are
    the tail of ``pages`` (`cut_top`). Nothing here reads a tensor's values back to the
    host except `sorted_at_or_above`.
    """

    def __init__(self, device: torch.device, *, staged: bool) -> None:
        self.device = device
        self.staging = staged
        self.pages: torch.Tensor = torch.empty((0,), dtype=torch.int64, device=device)
        self.staged: list[torch.Tensor] = []
        self.num_staged = 0

    @property
    def count(self) -> int:
        """Free pages, merged and staged."""
        return self.pages.shape[0] + self.num_staged

    def take(self, n_pages: int) -> torch.Tensor:
        """The ``n_pages`` lowest merged pages, removed (the caller made sure there
        are)."""
        out = self.pages[:n_pages]
        self.pages = self.pages[n_pages:]
        return out

    def put(self, page_ids: torch.Tensor) -> None:
        """Free pages (int64, on the device, each exactly once)."""
        if self.staging:
            self.staged.append(page_ids.clone())  # the caller may reuse its tensor
            self.num_staged += page_ids.numel()
        else:
            self.pages = merge_sorted(self.pages, page_ids)

    def merge(self) -> None:
        """Fold the staged frees into ``pages``."""
        if not self.staged:
            return
        self.pages = merge_sorted(self.pages, torch.cat(self.staged))
        self.staged = []
        self.num_staged = 0

    def staged_ids(self) -> torch.Tensor | None:
        """Every staged page in one tensor (None if none)."""
        if not self.staged:
            return None
        return torch.cat(self.staged) if len(self.staged) > 1 else self.staged[0]

    def all(self) -> torch.Tensor:
        """Every free page, staged ones included (a page freed twice shows up twice)."""
        if not self.staged:
            return self.pages
        return torch.cat((self.pages, *self.staged))

    def append_top(self, page_ids: torch.Tensor) -> None:
        """A new top segment's pages (sorted, above every free page)."""
        self.pages = torch.cat((self.pages, page_ids))

    def cut_top(self, n_pages: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Remove the ``n_pages`` highest merged pages; returns (kept, removed)."""
        cut = self.pages.shape[0] - n_pages
        kept, removed = self.pages[:cut], self.pages[cut:]
        self.pages = kept
        return kept, removed

    def sorted_at_or_above(self, page: int) -> int:
        """Merged free pages with an id of at least ``page`` (waits for the device)."""
        return self.pages.shape[0] - int(torch.searchsorted(self.pages, page))

    def reset(self, pages: torch.Tensor) -> None:
        """Exactly ``pages`` free (sorted), nothing staged."""
        self.pages = pages
        self.staged = []
        self.num_staged = 0
