"""Segmented mode: the rotary cos/sin cache grows with the positions in use.

Upstream pre-expands every RoPE cache to the context length at model load
(`reserve_rope_cache_for_long_sequences`, so CUDA graphs see a fixed tensor): 10M positions x
rotary_dim x 4 B, 640 MB for the tiny model and ~5 GB for head_dim 128, resident from the
start. In segmented mode on the CPU the cache keeps the size the model itself asks for and
grows (doubling, through upstream's own `_ensure_cos_sin_cache_length`) when a forward pass
reaches past it. Modules whose class overrides the forward methods keep upstream's reserve.
Not for GPUs: growing reallocates the cache, which a captured CUDA graph would not see.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sglang_kvalloc import modes
from sglang_kvalloc.upstream.state import STATE

logger = logging.getLogger(__name__)

_FORWARDS = ("forward", "forward_native", "forward_cpu")


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
    """AROUND `reserve_rope_cache_for_long_sequences`: where segmented mode may run on the
    CPU, mark the caches that can grow lazily instead of expanding them to the context."""
    model_config = args[0] if args else kwargs.get("model_config")
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
