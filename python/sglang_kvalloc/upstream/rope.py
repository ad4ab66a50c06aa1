"""Segmented mode: the rotary cos/sin cache grows with the positions in use.

Upstream pre-expands every RoPE cache to the context length at model load
(`reserve_rope_cache_for_long_sequences`, so CUDA graphs see a fixed tensor): 10M positions x
rotary_dim x 4 B, 640 MB for the tiny model and ~5 GB for head_dim 128, resident from the
start.

- On the CPU the cache keeps the size the model itself asks for and grows (doubling, through
  upstream's own `_ensure_cos_sin_cache_length`) when a forward pass reaches past it.
- On a GPU a captured CUDA graph holds the cache's address, so the cache cannot be
  reallocated: it becomes one fixed-address tensor of the full length over a reserved range
  (the CUDA VMM backing), committed (doubling) ahead of the positions the next scheduler
  step can reach, and filled with upstream's own formula for those rows. Rows not committed
  read the scratch page's zeros; no position reaches them.

Modules whose class computes its cache differently (or overrides the forward methods, on the
CPU) keep upstream's reservation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sglang_kvalloc import modes
from sglang_kvalloc.upstream.state import STATE

logger = logging.getLogger(__name__)

_FORWARDS = ("forward", "forward_native", "forward_cpu")
# Subclasses with their own incremental growth (upstream's `_ensure_cos_sin_cache_length`) and
# own forwards, which the plugin hooks too (plugin.ROPE_OWN_GROWTH): they grow lazily as well.
OWN_GROWTH = ("DeepseekScalingRotaryEmbedding",)


def before_scheduler_init(self: Any, server_args: Any, *args: Any, **kwargs: Any) -> None:
    """BEFORE `Scheduler.__init__`: the model loads before the pools, so note the mode now."""
    STATE.requested_mode = modes.requested_mode(server_args)
    STATE.device = str(getattr(server_args, "device", "") or "")
    return None


def _can_grow_lazily(module: Any) -> bool:
    from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding

    if not isinstance(module, RotaryEmbedding):
        return False
    for klass in type(module).__mro__:
        if klass is RotaryEmbedding:
            return True
        if klass.__name__ in OWN_GROWTH and klass.__module__.startswith("sglang."):
            return True
        if any(name in vars(klass) for name in (*_FORWARDS, "_ensure_cos_sin_cache_length")):
            return False
    return False


def _grows_lazily_here(model_config: Any) -> bool:
    """Segmented on the CPU always; auto on the CPU only past the model's own positions (where
    upstream would expand the caches), so ordinary contexts keep upstream's behaviour."""
    if not STATE.device.startswith("cpu"):
        return False
    if STATE.requested_mode == modes.SEGMENTED:
        return True
    if STATE.requested_mode != modes.AUTO or model_config is None:
        return False
    hf_text = getattr(model_config, "hf_text_config", None)
    positions = getattr(hf_text, "max_position_embeddings", None)
    context = getattr(model_config, "context_len", None)
    return bool(positions and context and context > positions)


def around_reserve_rope_cache(
    original: Callable[..., Any], model: Any, *args: Any, **kwargs: Any
) -> Any:
    """AROUND `reserve_rope_cache_for_long_sequences`: where segmented mode may run, caches
    grow with the positions in use instead of being expanded to the context (see above)."""
    model_config = args[0] if args else kwargs.get("model_config")
    if STATE.device.startswith("cuda") and STATE.requested_mode in (modes.SEGMENTED, modes.AUTO):
        return _reserve_fixed_address(original, model, model_config, *args, **kwargs)
    if not _grows_lazily_here(model_config):
        return original(model, *args, **kwargs)
    lazy = eager = 0
    for module in model.modules():
        if hasattr(module, "_ensure_cos_sin_cache_length") and hasattr(module, "cos_sin_cache"):
            if _can_grow_lazily(module):
                module._kvalloc_lazy_rope = True
                lazy += 1
            else:
                eager += 1
    if eager:
        original(model, *args, **kwargs)  # only the eager ones still need it; lazy ones grow
    logger.info(
        "KV alloc mode %s: %d RoPE cache(s) grow with the positions in use instead of being "
        "sized to the context at start-up%s.",
        STATE.requested_mode,
        lazy,
        f"; {eager} keep upstream's reservation" if eager else "",
    )
    return None


def before_rope_forward(self: Any, positions: Any, *args: Any, **kwargs: Any) -> None:
    """BEFORE the RoPE forward methods: make the cache cover the positions about to be used."""
    if not getattr(self, "_kvalloc_lazy_rope", False) or positions.numel() == 0:
        return None
    offsets = kwargs.get("offsets", args[2] if len(args) > 2 else None)
    top = int(positions.max())
    if offsets is not None and offsets.numel():
        top += int(offsets.max())
    current = int(self.cos_sin_cache.shape[0])
    if top >= current:
        # Doubling keeps growth amortised O(positions) for a request that decodes far.
        self._ensure_cos_sin_cache_length(max(top, 2 * current - 1))
    return None


# -- GPU: one fixed-address cache per module, committed ahead of the positions in use ----------

_FIXED: list[FixedAddressRope] = []


class FixedAddressRope:
    """A module's cos/sin cache over a reservation of ``total`` rows: its address never
    changes; rows are committed (and computed) as positions reach them."""

    def __init__(self, module: Any, total: int, dtype: Any, backings: Any) -> None:
        import torch

        from sglang_kvalloc.core.rows import RowCommits

        cache = module.cos_sin_cache
        rows, width = int(cache.shape[0]), int(cache.shape[1])
        self.module = module
        self.total = total
        self.dtype = dtype
        self.row_bytes = width * torch.empty((), dtype=dtype).element_size()
        self.backing = backings(total * self.row_bytes)
        # One "row" of the RowCommits bookkeeping: the whole table, committed as a prefix.
        self._commits = RowCommits(self.backing, 1, total * self.row_bytes)
        self.view = self.backing.tensor(dtype, (total, width))
        self.rows = 0
        self._commits.ensure(0, rows * self.row_bytes)
        self.view[:rows].copy_(cache.to(device=self.view.device, dtype=dtype))
        self.rows = rows
        # The activation dtype already: upstream's first forward would otherwise cast (and
        # so reallocate) the cache.
        module.cos_sin_cache = self.view

    def grow(self, positions: int) -> None:
        """Make rows ``[0, positions)`` valid (doubling, at most the reservation)."""
        import torch

        if positions <= self.rows:
            return
        new_rows = min(self.total, max(positions, 2 * self.rows))
        self._commits.ensure(0, new_rows * self.row_bytes)
        module = self.module
        # Upstream's incremental formula (`_ensure_cos_sin_cache_length`) for the new rows.
        inv_freq = module._compute_inv_freq(module.base).to(device=self.view.device)
        start = module.position_start + self.rows
        t = torch.arange(start, module.position_start + new_rows, dtype=inv_freq.dtype,
                         device=self.view.device)  # fmt: skip
        freqs = torch.einsum("i,j->ij", t, inv_freq)
        self.view[self.rows : new_rows].copy_(torch.cat((freqs.cos(), freqs.sin()), dim=-1))
        self.rows = new_rows

    @property
    def committed_bytes(self) -> int:
        return self._commits.committed_bytes


def _computes_cache_like_upstream_base(module: Any) -> bool:
    """The cache is upstream's base formula over ``_compute_inv_freq`` (Llama-3 scaling and
    the plain rotary embedding qualify; YaRN-style mscale variants do not)."""
    from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding

    if not isinstance(module, RotaryEmbedding):
        return False
    for klass in type(module).__mro__:
        if klass is RotaryEmbedding:
            return True
        if any(
            name in vars(klass)
            for name in ("_compute_cos_sin_cache", "_ensure_cos_sin_cache_length")
        ):
            return False
    return False


def upstream_reserve_length(model_config: Any) -> int:
    """The length upstream's `reserve_rope_cache_for_long_sequences` expands caches to."""
    from sglang.srt.environ import envs
    from sglang.srt.runtime_context import get_model, get_spec

    base = (
        get_model().context_length
        or getattr(model_config, "context_len", None)
        or getattr(model_config.hf_text_config, "max_position_embeddings", None)
        or 2048
    )
    steps = int(get_spec().speculative_num_steps or 0)
    draft = int(get_spec().speculative_num_draft_tokens or 0)
    reserve = base + steps * draft * envs.SGLANG_SPEC_EXPANSION_SAFETY_FACTOR.get()
    reserve += envs.SGLANG_ROPE_CACHE_SAFETY_MARGIN.get()
    align = envs.SGLANG_ROPE_CACHE_ALIGN.get()
    return int((reserve + align - 1) // align * align)


def _reserve_fixed_address(
    original: Callable[..., Any], model: Any, model_config: Any, *args: Any, **kwargs: Any
) -> Any:
    from sglang_kvalloc.upstream.segmented import open_backings

    total = upstream_reserve_length(model_config)
    candidates = [
        m
        for m in model.modules()
        if hasattr(m, "_ensure_cos_sin_cache_length")
        and hasattr(m, "cos_sin_cache")
        and int(m.cos_sin_cache.shape[0]) < total
    ]
    if not candidates:
        return original(model, *args, **kwargs)
    try:
        backings = open_backings(STATE.device)
    except modes.KvAllocModeError as exc:
        logger.info("RoPE caches keep upstream's reservation: %s", exc)
        return original(model, *args, **kwargs)
    fixed = 0
    for module in candidates:
        if _computes_cache_like_upstream_base(module):
            _FIXED.append(FixedAddressRope(module, total, model_config.dtype, backings))
            fixed += 1
    # The rest (other formulas) get upstream's reservation; fixed ones are long enough.
    original(model, *args, **kwargs)
    logger.info(
        "KV alloc mode %s on %s: %d RoPE cache(s) of %d positions reserved at a fixed address "
        "and committed as positions are reached (%d kept upstream's reservation).",
        STATE.requested_mode,
        STATE.device,
        fixed,
        total,
        len(candidates) - fixed,
    )
    return None


def has_fixed_caches() -> bool:
    return bool(_FIXED)


def grow_fixed_caches(positions: int) -> None:
    """Before a scheduler step: every fixed cache covers ``positions`` rows."""
    for cache in _FIXED:
        cache.grow(positions)


def fixed_cache_bytes() -> int:
    return sum(cache.committed_bytes for cache in _FIXED)
