"""Every unit test starts and ends with the plugin's per-process state fresh."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sglang.srt.mem_cache.segmented.runtime import RUNTIME


@pytest.fixture(autouse=True)
def fresh_runtime() -> Iterator[None]:
    RUNTIME.reset()
    yield
    RUNTIME.reset()
