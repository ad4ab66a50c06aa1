"""Segmented mode: the rotary cos/sin cache grows with the positions in use.

Upstream pre-expands every RoPE cache to the context length at model load
(`reserve_rope_cache_for_long_sequences`, so CUDA graphs see a fixed tensor): positions
x rotary_dim x 4 B, about 5 GB for head_dim 128 at a 10M context, resident from the
start.

- Where a first write commits memory (the CPU backing), the cache keeps the size the
  model itself asks for and grows (doubling, through upstream's own
  `_ensure_cos_sin_cache_length`) when a forward pass reaches past it.
- Where memory must be committed before use (a GPU), a captured CUDA graph holds the
  cache's address, so the cache cannot be reallocated: it becomes one fixed-address
  tensor of the full length over a reserved range, committed at start as far as a
  position can reach (the KV pool's capacity: `RopeCaches.commit_up_to`, so nothing
  grows while serving), in the dtype upstream's forward reads it in (float32 on CUDA,
  which the JIT rope kernel requires), and filled with upstream's own formula. Rows past
  it read the scratch page's zeros; no position reaches them.

Only where the mode may need it: segmented, or auto past the model's own positions (the
only place auto can end in segmented because of RoPE). At an ordinary context auto
leaves every cache exactly as upstream builds it. When auto then settles on static,
fixed caches are committed whole (`RopeCaches.complete`), as upstream would have them.
Modules whose class computes its cache differently (or overrides the forward methods, on
the CPU) keep upstream's reservation.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from sglang.srt.mem_cache.segmented import backing_choice, modes
from sglang.srt.mem_cache.segmented.backing import BackingFactory
from sglang.srt.mem_cache.segmented.rope_cache import FixedAddressRope
from sglang.srt.mem_cache.segmented.runtime import RUNTIME

if TYPE_CHECKING:
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding

logger = logging.getLogger(__name__)

_FORWARDS = ("forward", "forward_native", "forward_cpu")
# Subclasses with their own incremental growth (upstream's `_ensure_cos_sin_cache_length`) and
# own forwards, which call these hooks too: they grow lazily as well.
OWN_GROWTH = ("DeepseekScalingRotaryEmbedding",)


def _can_grow_lazily(module: torch.nn.Module) -> bool:
    from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding

    if not isinstance(module, RotaryEmbedding):
        return False
    for klass in type(module).__mro__:
        if klass is RotaryEmbedding:
            return True
        if klass.__name__ in OWN_GROWTH and klass.__module__.startswith("sglang."):
            return True
        if any(
            name in vars(klass) for name in (*_FORWARDS, "_ensure_cos_sin_cache_length")
        ):
            return False
    return False


def _past_model_positions(model_config: ModelConfig | None) -> bool:
    """The context reaches past the model's own positions (upstream's override is set)."""
    hf_text = getattr(model_config, "hf_text_config", None)
    positions = getattr(hf_text, "max_position_embeddings", None)
    context = getattr(model_config, "context_len", None)
    return bool(positions and context and context > positions)


def _mode_may_need_lazy_rope(model_config: ModelConfig | None) -> bool:
    """Segmented always; auto only past the model's own positions, so that at an
    ordinary context auto keeps upstream's caches exactly (auto decides only after the
    model loads)."""
    requested = RUNTIME.requested_mode()
    if requested == modes.SEGMENTED:
        return True
    return requested == modes.AUTO and _past_model_positions(model_config)


# Depth of this module's own calls of upstream's reservation (for the caches that keep it, or
# to ask it the length): upstream's function then runs as it is (model loading is one thread).
_UPSTREAMS_OWN: list[bool] = []


def _upstreams_reservation(model: torch.nn.Module, model_config: ModelConfig) -> None:
    """Upstream's own `reserve_rope_cache_for_long_sequences`, run as it is."""
    from sglang.srt.utils import common

    _UPSTREAMS_OWN.append(True)
    try:
        common.reserve_rope_cache_for_long_sequences(model, model_config)
    finally:
        _UPSTREAMS_OWN.pop()


def rope_reserved_lazily(
    model: torch.nn.Module, model_config: ModelConfig, *args: Any, **kwargs: Any
) -> bool:
    """Called first in `reserve_rope_cache_for_long_sequences`, which returns at once
    where it answers True: where segmented mode may run, caches grow with the positions
    in use instead of being expanded to the context (see above); True where this
    reserved them, False where upstream's reservation runs."""
    if (
        _UPSTREAMS_OWN
        or not RUNTIME.device
        or not _mode_may_need_lazy_rope(model_config)
    ):
        return False
    try:
        backings = backing_choice.open_backings(RUNTIME.device)
    except modes.KvAllocModeError as exc:
        logger.info("RoPE caches keep upstream's reservation: %s", exc)
        return False
    if not backings.faults_in:
        _reserve_fixed_address(model, model_config, backings)
        return True
    lazy = eager = 0
    for module in model.modules():
        if hasattr(module, "_ensure_cos_sin_cache_length") and hasattr(
            module, "cos_sin_cache"
        ):
            if _can_grow_lazily(module):
                module._kvalloc_lazy_rope = True
                lazy += 1
            else:
                eager += 1
    if eager:
        _upstreams_reservation(model, model_config)  # the eager ones; lazy ones grow
    logger.info(
        "KV alloc mode %s: %d RoPE cache(s) grow with the positions in use instead of being "
        "sized to the context at start-up%s.",
        RUNTIME.requested_mode(),
        lazy,
        f"; {eager} keep upstream's reservation" if eager else "",
    )
    return True


def before_rope_forward(
    self: RotaryEmbedding, positions: torch.Tensor, *args: Any, **kwargs: Any
) -> None:
    """Called first in the RoPE forward methods: make the cache cover the positions
    about to be used."""
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


def fixed_cache_dtype(module: RotaryEmbedding, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype upstream's forward reads this module's cache in: the one it was built
    in (float32 on CUDA: the JIT rope kernel for head sizes 64/128/256/512 requires it),
    except where the forward casts it to the activation dtype (upstream's fallback
    kernel for other head sizes), which would reallocate a fixed cache: there the
    activation dtype already."""
    if getattr(module, "use_fallback_kernel", False):
        return model_dtype
    return module.cos_sin_cache.dtype


def _computes_cache_like_upstream_base(module: torch.nn.Module) -> bool:
    """The cache is upstream's base formula over ``_compute_inv_freq`` (Llama-3 scaling
    and the plain rotary embedding qualify; YaRN-style mscale variants do not)."""
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


class _ReserveProbe(torch.nn.Module):
    """Stands in for a RoPE module: records the length upstream's reservation asks for."""

    def __init__(self) -> None:
        super().__init__()
        self.cos_sin_cache = torch.empty(0)
        self.asked: int | None = None

    def _ensure_cos_sin_cache_length(self, needed_max_pos: int) -> None:
        self.asked = int(needed_max_pos)


def upstream_reserve_length(model_config: ModelConfig) -> int:
    """The length upstream's `reserve_rope_cache_for_long_sequences` expands caches to,
    asked of upstream's own function (its formula, fallbacks and settings)."""
    root = torch.nn.Module()
    root.probe = _ReserveProbe()
    _upstreams_reservation(root, model_config)
    if root.probe.asked is None:
        raise RuntimeError("upstream's RoPE reservation asked for no length")
    return root.probe.asked + 1


def _reserve_fixed_address(
    model: torch.nn.Module, model_config: ModelConfig, backings: BackingFactory
) -> None:
    total = upstream_reserve_length(model_config)
    candidates = [
        m
        for m in model.modules()
        if hasattr(m, "_ensure_cos_sin_cache_length")
        and hasattr(m, "cos_sin_cache")
        and int(m.cos_sin_cache.shape[0]) < total
    ]
    if not candidates:
        return _upstreams_reservation(model, model_config)
    fixed = 0
    for module in candidates:
        if _computes_cache_like_upstream_base(module):
            dtype = fixed_cache_dtype(module, model_config.dtype)
            margin = max(0, total - int(model_config.context_len))
            RUNTIME.rope.add(FixedAddressRope(module, total, dtype, backings, margin))
            fixed += 1
    # The rest (other formulas) get upstream's reservation; fixed ones are long enough.
    _upstreams_reservation(model, model_config)
    logger.info(
        "KV alloc mode %s on %s: %d RoPE cache(s) of %d positions reserved at a fixed address "
        "and committed as positions are reached (%d kept upstream's reservation).",
        RUNTIME.requested_mode(),
        RUNTIME.device,
        fixed,
        total,
        len(candidates) - fixed,
    )
    return None
