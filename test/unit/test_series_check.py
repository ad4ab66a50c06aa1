"""`series check`: every edit of the series tried on a tree one at a time, for a rebase onto
another upstream (apply stops at the first refusal)."""

from __future__ import annotations

from pathlib import Path

from test_series import upstream_copy

from sglang_kvalloc_harness import series_check


def test_a_tree_that_moved_on_is_reported_edit_by_edit(tmp_path: Path) -> None:
    package = upstream_copy(tmp_path)
    clean = series_check.check(package)
    assert clean and not [f for f in clean if f.problem]
    # Upstream moved on: a function the series edits renamed, an anchor line gone, a function
    # that gained an early return, and a file the series adds already there.
    configurator = package / "srt" / "mem_cache" / "kv_cache_configurator.py"
    text = configurator.read_text()
    configurator.write_text(text.replace("def _build_mla_kv_pool(", "def _build_latent_pool("))
    pipeline = package / "srt" / "arg_groups" / "pipeline.py"
    pipeline.write_text(pipeline.read_text().replace("run_hook(handle_gpu_memory_settings,", "x("))
    scheduler = package / "srt" / "managers" / "scheduler.py"
    head, flush = scheduler.read_text().split("    def flush_cache(self", 1)
    idle = "        if self.is_fully_idle(ignore_waiting=self._engine_paused):\n"
    flush = flush.replace(idle, "        if self is None:\n            return\n" + idle, 1)
    scheduler.write_text(f"{head}    def flush_cache(self{flush}")
    existing = package / "srt" / "mem_cache" / "segmented" / "geometry.py"
    existing.parent.mkdir(parents=True)
    existing.write_text("")
    problems = {(f.kind, f.what.split(" [")[0]): f.problem for f in series_check.check(package)}
    problems = {key: problem for key, problem in problems.items() if problem}
    assert set(problems) == {
        ("edit", "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
                 "._build_mla_kv_pool"),
        ("insertion", "srt/arg_groups/pipeline.py: next to "
                      "'run_hook(handle_gpu_memory_settings, server_args)'"),
        ("edit", "sglang.srt.managers.scheduler.Scheduler.flush_cache"),
        ("new file", "srt/mem_cache/segmented/geometry.py"),
    }, problems  # fmt: skip
    flush_problem = problems[("edit", "sglang.srt.managers.scheduler.Scheduler.flush_cache")]
    assert "changed shape" in flush_problem and "decorator here" in flush_problem
    report = series_check.report(series_check.check(package))
    assert report.endswith(f"{len(clean) - 4} of {len(clean)} checks pass on this tree")
