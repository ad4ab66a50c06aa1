"""Held to the GPU machine's closure: with KIT_HIDE=1 and this folder on PYTHONPATH, every
process (the server's spawned scheduler and detokenizer too) hides what the GPU machine would
not have (gpu_kit/kit_closure.py). Used by the kit's CPU proof only."""

import os

if os.environ.get("KIT_HIDE") == "1":
    import sys

    _here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, _here)
    try:
        import kit_closure

        kit_closure.install_hiding()
    finally:
        sys.path.remove(_here)
