"""The offline `sglang.Engine` API with the `kv_alloc_mode` keyword."""

from __future__ import annotations

import os
from pathlib import Path

from sglang_kvalloc.serving import CPU_ENV


def test_engine_keyword_reaches_the_scheduler(tiny_model: Path) -> None:
    os.environ.update(CPU_ENV)
    import sglang

    engine = sglang.Engine(
        model_path=str(tiny_model),
        device="cpu",
        dtype="float32",
        max_total_tokens=4096,
        kv_alloc_mode="static",
    )
    try:
        out = engine.generate("Hello world", {"max_new_tokens": 5, "temperature": 0})
        assert out["meta_info"]["completion_tokens"] == 5
        info = engine.get_server_info()
        assert info["kv_alloc_mode"] == "static"
        assert info["internal_states"][0]["kv_alloc"]["requested_mode"] == "static"
    finally:
        engine.shutdown()
