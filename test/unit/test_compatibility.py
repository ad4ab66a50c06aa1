"""docs/compatibility.md stays true: every test a row names exists, and the rows that rest on
"no hook touches it" are checked against the hook list itself."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TABLE = REPO / "docs" / "compatibility.md"
NAMED_TEST = re.compile(r"`(test/[\w/]+\.py)::(?:Test\w+::)?(test_\w+)`")


def _rows() -> list[str]:
    lines = TABLE.read_text().splitlines()
    return [line for line in lines if line.startswith("| ") and not line.startswith("| ---")][1:]


def test_every_row_names_a_test_and_each_test_exists() -> None:
    rows = _rows()
    assert len(rows) >= 20
    missing = []
    for row in rows:
        named = NAMED_TEST.findall(row)
        assert named, f"a row without a test: {row[:80]}"
        for path, name in named:
            source = REPO / path
            if not source.exists() or f"def {name}(" not in source.read_text():
                missing.append(f"{path}::{name}")
    assert not missing, missing


def test_every_refusal_quoted_is_the_line_the_code_says() -> None:
    """The quoted refusals are the code's own lines (flag values as in the first example)."""
    package = REPO / "python" / "sglang_kvalloc"
    source = "".join(
        (package / f).read_text()
        for f in (
            "in_tree/sglang/srt/mem_cache/segmented/refusals.py",
            "in_tree/sglang/srt/mem_cache/segmented/pool_config.py",
            "in_tree/sglang/srt/mem_cache/segmented/auto_pools.py",
            "in_tree/sglang/srt/mem_cache/segmented/backing_choice.py",
        )
    )
    # The code writes its lines as adjacent f-string literals: compare word by word.
    words = set(re.findall(r"[\w\-']+", source))
    segmented_cells = [row.split(" | ")[1] for row in _rows()]
    quoted = [q for c in segmented_cells for q in re.findall(r'refused[^"]*: "([^"]+)"', c)]
    assert len(quoted) >= 5  # PD, HiCache, PP, DP attention with graphs, Mooncake pools
    for line in quoted:
        unknown = [w for w in re.findall(r"[\w\-']+", line) if w not in words]
        # The flag's value and the device are filled in at run time (prefill, cuda:0).
        assert set(unknown) <= {"prefill", "cuda", "0"}, (line, unknown)


@pytest.mark.parametrize(
    "untouched",
    [
        "sglang.srt.lora.",
        "sglang.srt.model_executor.runner.prefill_cuda_graph_runner.",
        "sglang.srt.model_executor.runner_backend_utils.",
        "sglang.srt.compilation.",
        "torch.",
    ],
)
def test_no_hook_touches_lora_prefill_graphs_or_torch_compile(untouched: str) -> None:
    from sglang_kvalloc.upstream import plugin

    targets = [target for target, _, _ in plugin.hooks()]
    assert len(targets) > 40
    assert not [t for t in targets if t.startswith(untouched)]


def test_devices_segmented_cannot_back_are_refused_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A device without a backing, upstream's post-capture KV sizing, ROCm: one line each."""
    import torch
    from sglang.srt.mem_cache.segmented import backing_choice, modes
    from sglang.srt.mem_cache.segmented.backing import BackingUnavailableError
    from sglang.srt.mem_cache.segmented.cuda_vmm import UpstreamVmmApi

    with pytest.raises(modes.KvAllocModeError, match="no backing for device 'npu'") as npu:
        backing_choice.open_backings("npu")
    monkeypatch.setenv("SGLANG_ENABLE_POST_CAPTURE_KV_SIZING", "1")
    with pytest.raises(modes.KvAllocModeError, match="unset SGLANG_ENABLE_POST_CAPTURE") as post:
        backing_choice.open_backings("cuda:0")
    monkeypatch.setattr(torch.version, "hip", "6.2")
    with pytest.raises(BackingUnavailableError, match="no ROCm backing") as rocm:
        UpstreamVmmApi(0)
    for refused in (npu, post, rocm):
        assert "\n" not in str(refused.value)
