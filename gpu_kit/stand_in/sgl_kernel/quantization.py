"""``sgl_kernel.quantization`` stand-in: imported unguarded by upstream's
``layers/quantization/gguf.py`` on CUDA; its ops (GGUF) raise when called."""

from ._missing import missing_getattr

__getattr__ = missing_getattr("quantization")
