"""Gather what the GPU suite needs from the installed upstream SGLang into an ignored folder.

The lent GPU machines have torch, triton and cuda-bindings but no upstream SGLang (its 0.5.23
wheel pins another torch) and no network. The suite needs four upstream modules, none of
which import more than torch, triton and a few helpers:

- ``sglang/srt/utils/cuda_vmm_utils.py``: the VMM helpers the backing reuses;
- ``sglang/kernels/ops/attention/{decode,extend}_attention.py`` and ``score_mod.py``: the
  Triton attention kernels checked over VMM-backed K/V;
- ``sglang/srt/environ.py``: the environment switches those kernels read (stdlib only).

They are copied as they are into ``.gpu-upstream/`` (git-ignored; never committed), beside
package stubs written here that give the few helpers those modules import from
``sglang.srt.utils`` and ``sglang.srt.runtime_context``. Run it where upstream is installed:

    python test/gpu/collect_upstream.py [--out .gpu-upstream]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

COPIED = [
    "srt/utils/cuda_vmm_utils.py",
    "srt/environ.py",
    "kernels/ops/attention/decode_attention.py",
    "kernels/ops/attention/extend_attention.py",
    "kernels/ops/attention/score_mod.py",
]

UTILS_STUB = '''"""Stub of sglang.srt.utils for the GPU suite (sglang-kvalloc's, not upstream's)."""

import functools
import logging

import torch


def log_info_on_rank0(logger: logging.Logger, msg: str) -> None:
    logger.info(msg)


def is_hip() -> bool:
    return torch.version.hip is not None


def is_cuda() -> bool:
    return torch.version.cuda is not None and torch.cuda.is_available()


def is_gfx95_supported() -> bool:
    return False


def is_gfx1250_supported() -> bool:
    return False


@functools.cache
def get_device_core_count(device_id: int = 0) -> int:
    return torch.cuda.get_device_properties(device_id).multi_processor_count
'''

RUNTIME_CONTEXT_STUB = '''"""Stub of sglang.srt.runtime_context: nothing is published."""


def get_exec():
    raise ValueError("config namespace 'exec' not published")
'''

PACKAGE_STUB = (
    '"""Package stub for the GPU suite (sglang-kvalloc); upstream modules sit beside it."""\n'
)


def collect(out: Path) -> list[Path]:
    import sglang

    root = Path(sglang.__file__).resolve().parent
    written = []
    for rel in COPIED:
        target = out / "sglang" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / rel, target)
        written.append(target)
    stubs = {
        "__init__.py": PACKAGE_STUB,
        "srt/__init__.py": PACKAGE_STUB,
        "srt/mem_cache/__init__.py": PACKAGE_STUB,
        "srt/utils/__init__.py": UTILS_STUB,
        "srt/runtime_context.py": RUNTIME_CONTEXT_STUB,
        "kernels/__init__.py": PACKAGE_STUB,
        "kernels/ops/__init__.py": PACKAGE_STUB,
        "kernels/ops/attention/__init__.py": PACKAGE_STUB,
    }
    for rel, text in stubs.items():
        target = out / "sglang" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        written.append(target)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".gpu-upstream"))
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    files = collect(args.out)
    print(f"collected {len(files)} files into {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
