"""One mode decision per process, written once and asked by every hook (issue 33)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
from decisions import decision
from sglang.srt.mem_cache.segmented import modes
from sglang.srt.mem_cache.segmented.runtime import RUNTIME, DecisionMadeError

UPSTREAM_HOOKS = Path(modes.__file__).parent / "upstream"
# What segmented pools, allocators and rows add to upstream's classes: a hook asks the
# decision whether they are there, never the object.
CAPABILITIES = {
    "scheduler_step", "note_busy", "idle_step", "maybe_shrink_now", "withheld_size",
    "swa_withheld_size", "segment_stats", "segmented_buffers", "suspend", "resume",
    "resident_bytes", "commits_rows", "release_all", "restore_padding_row", "committed_bytes",
}  # fmt: skip


def test_the_decision_is_written_once_and_static_until_then() -> None:
    assert not RUNTIME.decided and RUNTIME.decision is modes.UNDECIDED
    assert not RUNTIME.decision.segmented and not RUNTIME.decision.kv_on_demand
    made = decision(modes.SEGMENTED, explicit_commits=True)
    RUNTIME.decide(made)
    RUNTIME.decide(made)  # the same decision again (a second resolve) changes nothing
    with pytest.raises(DecisionMadeError):
        RUNTIME.decide(decision(modes.STATIC))
    with pytest.raises(dataclasses.FrozenInstanceError):
        RUNTIME.decision.mode = modes.STATIC  # type: ignore[misc]
    assert RUNTIME.decision is made


def test_the_two_mechanisms_follow_from_the_decision() -> None:
    tables_only = decision(modes.SEGMENTED, kind="hybrid_linear", kv_pool_problem="not here")
    assert tables_only.lazy_tables and not tables_only.kv_on_demand
    assert tables_only.kv_pool_note == "not here"
    both = decision(modes.SEGMENTED)
    assert both.lazy_tables and both.kv_on_demand and "committed segment" in both.kv_pool_note
    static = decision(modes.STATIC, requested=modes.AUTO)
    assert not static.lazy_tables and not static.kv_on_demand and static.kv_pool_note == ""
    assert static.backing == modes.NO_BACKING and not static.explicit_commits


def test_server_info_reports_the_decision_beside_the_figures() -> None:
    RUNTIME.decide(decision(modes.SEGMENTED, explicit_commits=True, requested=modes.AUTO))
    RUNTIME.state.token_capacity = 1234
    report = RUNTIME.as_dict()
    assert report["mode"] == modes.SEGMENTED and report["requested_mode"] == modes.AUTO
    assert report["backing"] == modes.CUDA_VMM and report["explicit_commits"] is True
    assert report["lazy_tables"] and report["kv_on_demand"] and report["token_capacity"] == 1234


def _capability_probes(path: Path) -> list[str]:
    """`hasattr(x, "name")` / `getattr(x, "name", ...)` on a segmented capability."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            continue
        if node.func.id not in ("hasattr", "getattr") or len(node.args) < 2:
            continue
        name = node.args[1]
        if isinstance(name, ast.Constant) and name.value in CAPABILITIES:
            found.append(f"{path.name}:{node.lineno} {node.func.id}(..., {name.value!r})")
    return found


def test_no_hook_asks_an_object_what_the_decision_knows() -> None:
    probes = [p for path in sorted(UPSTREAM_HOOKS.rglob("*.py")) for p in _capability_probes(path)]
    assert probes == []
    state_fields = {f.name for f in dataclasses.fields(RUNTIME.state)}
    assert not state_fields & {"mode", "reason", "kv_on_demand", "lazy_tables", "requested_mode"}
