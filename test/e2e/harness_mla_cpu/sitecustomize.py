"""Test harness (on PYTHONPATH of the MLA servers only): an upstream CPU-engine bug worked around.

0.5.23 has no MLA handler for torch_native, so DeepSeek attention falls back to triton's
dispatch, which sends a prefill without a cached prefix down the MHA path; torch_native's
extend then ignores the k/v it is given and reads the pool's latent buffers as K and V. The
tokens are wrong in static and segmented mode alike (measured against HF transformers). Here
torch_native is registered to take the MLA (absorbed) path always, once upstream's handler
module is imported, so the servers can be compared with HF. Not part of the plugin.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from typing import Any

_HANDLER = "sglang.srt.models.deepseek_common.attention_backend_handler"


class _RegisterMlaPath(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != _HANDLER:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module: Any) -> None:
            exec_module(module)
            module.AttentionBackendRegistry.register(
                "torch_native", lambda attn, batch: module._dispatch_mla_subtype(attn, batch)
            )

        spec.loader.exec_module = exec_and_register  # type: ignore[method-assign]
        return spec


sys.meta_path.insert(0, _RegisterMlaPath())
