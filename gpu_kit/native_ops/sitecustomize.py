"""The GPU kit's servers only: with KIT_NATIVE_OPS=RMSNorm,SiluAndMul (the fused ops whose CUDA
path did not run on the lent machine: ``kit_kernels.py``) and this folder on PYTHONPATH, each
named class of upstream's runs its torch path where it would run its CUDA one. Every other op
keeps upstream's dispatch."""

import os

_names = [n for n in os.environ.get("KIT_NATIVE_OPS", "").split(",") if n]
if _names:
    import importlib

    _modules = {
        "RMSNorm": "sglang.srt.layers.layernorm",
        "SiluAndMul": "sglang.srt.layers.activation",
        "RotaryEmbedding": "sglang.srt.layers.rotary_embedding.base",
    }
    for _name in _names:
        _cls = getattr(importlib.import_module(_modules[_name]), _name)
        _cls.forward_cuda = _cls.forward_native
