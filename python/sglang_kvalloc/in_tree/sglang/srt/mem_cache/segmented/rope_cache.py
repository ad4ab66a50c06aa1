"""A rotary cos/sin cache at a fixed address, committed as positions reach it (segmented
mode where memory must be committed before use, a GPU). A captured CUDA graph holds the
cache's address, so it cannot be reallocated as upstream's growth would: it is one
tensor of the full length over a reserved range, its rows committed and computed (with
upstream's own incremental formula, read from the module) as positions reach them. Knows
nothing of upstream: the module is anything shaped like its rotary embedding
(`RotaryModule`)."""

from __future__ import annotations

from typing import Protocol

import torch

from sglang.srt.mem_cache.segmented.backing import BackingFactory
from sglang.srt.mem_cache.segmented.row_commits import RowCommits


class RotaryModule(Protocol):
    """What a fixed cache reads of a rotary embedding module (upstream's
    `RotaryEmbedding`)."""

    cos_sin_cache: torch.Tensor
    base: float
    position_start: int

    def _compute_inv_freq(self, base: float) -> torch.Tensor: ...


class FixedAddressRope:
    """A module's cos/sin cache over a reservation of ``total`` rows: its address never
    changes; rows are committed (and computed) as positions reach them."""

    def __init__(
        self,
        module: RotaryModule,
        total: int,
        dtype: torch.dtype,
        backings: BackingFactory,
        margin: int = 0,
    ) -> None:
        cache = module.cos_sin_cache
        rows, width = int(cache.shape[0]), int(cache.shape[1])
        self.module = module
        self.total = total
        self.margin = margin  # rows past the context that upstream's reservation adds
        self.dtype = dtype
        self.row_bytes = width * torch.empty((), dtype=dtype).element_size()
        self.backing = backings(total * self.row_bytes)
        # One "row" of the RowCommits bookkeeping: the whole table, committed as a prefix.
        # No queued kernel reads rows past the committed ones (positions stay below them).
        self._commits = RowCommits(
            self.backing, 1, total * self.row_bytes, commits_unused=True
        )
        self.view = self.backing.tensor(dtype, (total, width))
        self.rows = 0
        self._commits.ensure(0, rows * self.row_bytes)
        self.view[:rows].copy_(cache.to(device=self.view.device, dtype=dtype))
        self.rows = self._initial_rows = rows
        module.cos_sin_cache = self.view

    def grow(self, positions: int) -> None:
        """Make rows ``[0, positions)`` valid (at most the reservation); MemoryError
        (nothing changed) if the device cannot back them."""
        if positions <= self.rows:
            return
        new_rows = min(self.total, positions)
        self._commits.ensure(0, new_rows * self.row_bytes)
        module = self.module
        # Upstream's incremental formula (`_ensure_cos_sin_cache_length`) for the new rows,
        # computed in float32 and stored in the cache's dtype, as upstream does.
        inv_freq = module._compute_inv_freq(module.base).to(device=self.view.device)
        start = module.position_start + self.rows
        t = torch.arange(
            start,
            module.position_start + new_rows,
            dtype=inv_freq.dtype,
            device=self.view.device,
        )
        freqs = torch.einsum("i,j->ij", t, inv_freq)
        rows = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype=self.dtype)
        self.view[self.rows : new_rows].copy_(rows)
        self.rows = new_rows

    @property
    def committed_bytes(self) -> int:
        return self._commits.committed_bytes

    def release(self) -> int:
        """RL's memory release: the cache's memory goes back (no forward runs until
        `restore`); its first rows, upstream's own, are kept on the host. Returns the
        bytes."""
        released = self.committed_bytes
        if self.rows:
            self._released_rows = self.rows
            self._host_rows = self.view[: self._initial_rows].to("cpu", copy=True)
        self._commits.drop(0)
        self._commits.flush()
        self.rows = 0
        return released

    def restore(self) -> None:
        """Before the first forward after a release: the rows it had, upstream's first ones
        copied back and the rest computed with upstream's formula."""
        host = getattr(self, "_host_rows", None)
        if host is None or self.rows:
            return
        self._commits.ensure(0, self._initial_rows * self.row_bytes)
        self.view[: self._initial_rows].copy_(host.to(self.view.device))
        self.rows = self._initial_rows
        self._host_rows = None
        self.grow(self._released_rows)
