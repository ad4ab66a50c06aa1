"""Docs that are generated stay generated: the hook table of docs/design.md is the one
`scripts/hook_table.py` renders from `upstream/plugin.py`, the PR listing of
docs/upstream-prs.md the one `scripts/series_listing.py` renders from `series.py`, the tables
of docs/planner.md the ones `scripts/planner_tables.py` computes with the planner."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_design_hook_table_is_generated_from_plugin() -> None:
    table = _script("hook_table")
    from sglang_kvalloc.upstream import plugin

    assert table.current(), "docs/design.md lost its hook-table markers"
    assert table.current() == table.render(), (
        "docs/design.md's hook table is stale: run `python scripts/hook_table.py --write`"
    )
    assert f"{len(plugin.hooks())} hooks" in table.current()


def test_upstream_prs_listing_is_generated_from_the_series() -> None:
    listing = _script("series_listing")
    assert listing.current(), "docs/upstream-prs.md lost its listing markers"
    assert listing.current() == listing.render(), (
        "docs/upstream-prs.md's PR listing is stale: run `python scripts/series_listing.py --write`"
    )


def test_planner_tables_are_generated_from_the_planner() -> None:
    tables = _script("planner_tables")
    for name in tables.TABLES:
        assert tables.current(name), f"docs/planner.md lost the markers of table {name}"
        assert tables.current(name) == tables.render(name), (
            f"docs/planner.md's {name} table is stale: run `python scripts/planner_tables.py "
            "--write`"
        )
