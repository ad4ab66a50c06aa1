"""The GPU kit's stand-in for ``sgl_kernel`` (sglang-kernel's 1.1 GB CUDA build cannot travel).

Every name resolves: the two CPU ops sglang-kvalloc implements and ``weak_ref_tensor`` are
real, any other is a ``MissingKernel`` that raises, naming itself, when called (never a silent
wrong result). The kit probes upstream's default-path kernels first (``kit_kernels.py``) and
its servers keep off the ones that did not run; a call that still reaches one fails loudly. Unlike
sglang-kvalloc's CPU fallback, this is a package: the submodules upstream imports unguarded
on CUDA exist (``quantization``, ``kvcacheio``, ``utils`` with a real
``is_arch_support_pdl``); any other submodule is missing, as upstream's guards expect.
"""

from __future__ import annotations


def _become_stand_in() -> None:
    """Fill this module; populate() clears the module's names, so everything here is local."""
    import sys
    from pathlib import Path

    from sglang_kvalloc_harness.kernels import sgl_kernel_cpu

    module = sys.modules[__name__]
    here = str(Path(__file__).resolve().parent)
    sgl_kernel_cpu.populate(
        module, "sglang-kvalloc GPU kit stand-in: sglang-kernel's CUDA build cannot travel"
    )
    # populate() empties __path__ (a fallback with no submodules); this one has three.
    module.__path__ = [here]
    module.__package__ = module.__name__
    module.__version__ = "0.0.0+sglang-kvalloc-gpu-kit-stand-in"
    module.SGLANG_KVALLOC_STAND_IN = True
    # Which missing ops upstream bound (``from sgl_kernel import x``): the kit reports them.
    resolved: list[str] = []
    fallback = module.__getattr__

    def __getattr__(name: str) -> object:  # noqa: N807 - module-level __getattr__
        value = fallback(name)
        resolved.append(name)
        return value

    module.__getattr__ = __getattr__
    module.KIT_MISSING_RESOLVED = resolved

    def weak_ref_tensor(value: object) -> object:
        """sglang-kernel's ``weak_ref_tensor`` (breakable prefill graphs hand their outputs on
        with it) as an alias of the same storage. The real one holds no reference, so the
        graph's pool can reuse the memory; this one keeps it alive a little longer: the
        values are the same."""
        import torch

        return value.detach() if isinstance(value, torch.Tensor) else value

    module.weak_ref_tensor = weak_ref_tensor


_become_stand_in()
