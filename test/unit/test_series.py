"""The upstream PR series tool (issue 12) on copies of the installed upstream files it edits.

The whole proof (the series applied to a copy of the whole installed package, the server tests
run against it without the plugin) is `scripts/prove-upstream-series.sh`; it takes about 30
minutes and is not part of CI. Here: the plan covers every hook once, the edits land where
HookRegistry would have patched, and the decorator behaves as HookRegistry's wrappers."""

from __future__ import annotations

import ast
import dataclasses
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import sglang

from sglang_kvalloc.upstream import plugin
from sglang_kvalloc_harness import series, series_edits, series_prs

UPSTREAM = Path(sglang.__file__).resolve().parent


def test_every_hook_and_module_lands_in_exactly_one_pr() -> None:
    planned = series.plan()
    assert [p.pr.number for p in planned] == list(range(1, len(series.SERIES) + 1))
    edits = [e.target for p in planned for e in p.edits]
    assert sorted(edits) == sorted(t for t, _, _ in plugin.hooks())
    files = [f for p in planned for f in p.files]
    assert len(files) == len(set(files))
    assert "upstream/plugin.py" not in files and not any(f.startswith("kernels/") for f in files)
    assert {
        "in_tree/sglang/srt/mem_cache/segmented/attention_graph_buffers.py",
        "in_tree/sglang/srt/mem_cache/segmented/cuda_backing.py",
    } <= set(files)
    # What stays out: the planner (its CLI's estimate), its report and its model tables.
    assert not any(f == "plan.py" or f.startswith("core/") for f in files)
    assert not any(f.startswith("configs/") for f in files)
    # A module a PR imports at import time is never one a later PR brings.
    owner = {f: p.pr.number for p in planned for f in p.files}
    for p in planned:
        for rel in (f for f in p.files if f.endswith(".py")):
            deps = [d for d in series._imports(rel) if not series._excluded(d)]
            assert all(owner[dep] <= p.pr.number for dep in deps), rel


def test_a_pr_needing_a_module_outside_in_tree_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The series carries only files at their upstream paths (``in_tree/``): a PR whose
    closure reaches one of the plugin's own modules (the planner, say) is an error."""
    auto = next(pr for pr in series.SERIES if pr.slug == "auto-mode")
    with_planner = dataclasses.replace(auto, files=(*auto.files, "core/planner/decision.py"))
    monkeypatch.setattr(
        series, "SERIES", tuple(with_planner if pr is auto else pr for pr in series.SERIES)
    )
    monkeypatch.setattr(series, "NOT_IN_SERIES", ("upstream/", "__init__.py"))
    with pytest.raises(
        series_edits.SeriesError, match=r"PR 9 needs core/.*, which is not in in_tree/"
    ):
        series.plan()


def test_the_decorator_comes_with_the_first_pr_that_decorates_and_the_wrappers_stay_out() -> None:
    """`kvalloc_hook` is carried by the first PR with a decorated function (not by PR 1 for
    all); the plugin's wrappers of the inline calls (`upstream/inline.py`) are no PR's."""
    planned = series.plan()
    decorating = [p.pr.number for p in planned if any(not e.inline for e in p.edits)]
    owner = {f: p.pr.number for p in planned for f in p.files}
    assert decorating and owner[series_prs.DECORATOR_MODULE] == decorating[0]
    assert "upstream/inline.py" not in owner
    carried = [series.carried_text(f) for f in owner if f.endswith(".py")]
    assert not any("def instead(" in text or "def argument(" in text for text in carried)


def _is_inline_call(statement: ast.stmt) -> bool:
    """Whether ``statement`` is part of another hook's inline call (its import or call)."""
    if isinstance(statement, ast.ImportFrom):
        return (statement.module or "").startswith(
            ("sglang.srt.arg_groups.kv_alloc_hook", "sglang.srt.mem_cache.segmented.")
        )
    return isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Call)


def upstream_copy(tmp_path: Path) -> Path:
    """The installed package's files the series edits (and its version), copied."""
    package = tmp_path / "sglang"
    rels = {"_version.py"} | {i.file for pr in series.SERIES for i in pr.insertions}
    for target, _, _ in plugin.hooks():
        file, _ = series._target_file(UPSTREAM, target)
        rels.add(str(file.relative_to(UPSTREAM)))
    for rel in rels:
        (package / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(UPSTREAM / rel, package / rel)
    return package


def test_apply_decorates_each_target_once_and_carries_the_modules(tmp_path: Path) -> None:
    package = upstream_copy(tmp_path)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "add", "-A"], check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path), "commit",
         "-qm", "upstream"], check=True,
    )  # fmt: skip
    commits = series.apply(tmp_path, log=lambda _: None)
    assert len(commits) == len(series.SERIES)
    log = subprocess.run(
        ["git", "-C", str(tmp_path), "log", "--format=%s"], capture_output=True, text=True
    ).stdout.splitlines()
    n = len(series.SERIES)
    assert log[0].startswith(f"[kv-alloc-mode {n}/{n}]")
    assert log[n - 1].startswith(f"[kv-alloc-mode 1/{n}]")
    edits = {(e.target, e.hook): e for p in series.plan() for e in p.edits}
    for target, hook, hook_type in plugin.hooks():
        file, attrs = series._target_file(package, target)
        text = file.read_text()
        node = series._find_def(ast.parse(text), attrs)
        module = hook.__module__
        edit = edits[(target, f"{module}:{hook.__name__}")]
        decorations = [
            ast.get_source_segment(text, d)
            for d in node.decorator_list
            if f"{module}:{hook.__name__}" in (ast.get_source_segment(text, d) or "")
        ]
        # Every hook of the plugin is exactly one call site in upstream's function: the
        # plugin's very function, called inline (imported from its module), or decorating.
        calls = [
            n
            for n in ast.walk(node)
            if isinstance(n, ast.Call) and getattr(n.func, "id", None) == hook.__name__
        ]
        imports = [
            n
            for n in ast.walk(node)
            if isinstance(n, ast.ImportFrom)
            and n.module == module
            and [a.name for a in n.names] == [hook.__name__]
        ]
        if edit.inline:
            assert (len(calls), len(imports), decorations) == (1, 1, []), target
            start = 1 if ast.get_docstring(node) else 0
            if edit.form in ("start", "instead", "argument", "skip"):  # before upstream's code
                at = node.body.index(imports[0])
                assert all(_is_inline_call(x) for x in node.body[start:at]), target
            else:  # AFTER: the last thing, with upstream's result (then returned)
                last = [x.value for x in node.body[-2:] if isinstance(x, (ast.Expr, ast.Return))]
                assert calls[0] in last, target
        else:
            assert (len(calls), len(imports)) == (0, 0), target
            assert decorations == [f'kvalloc_hook("{hook_type}", "{module}:{hook.__name__}")'], (
                target
            )
        decorated = {
            series._target_file(package, e.target)[0] for e in edits.values() if not e.inline
        }
        assert text.count(series.IMPORT_LINE) == (file in decorated), file
    # Every file the series carries is at its upstream path: no folder of the plugin's own.
    assert not (package / "srt" / "kvalloc").exists()
    assert all(f.startswith(series.IN_TREE) for p in series.plan() for f in p.files)
    # The modules that would be upstream's are the plugin's very files, at upstream's paths.
    in_tree = sorted((series.SOURCE / "in_tree" / "sglang").rglob("*.py"))
    assert len(in_tree) >= 11
    for source in in_tree:
        rel = source.relative_to(series.SOURCE / "in_tree" / "sglang")
        assert (package / rel).read_bytes() == source.read_bytes(), rel
    # The flag is declared as upstream declares fields: KvAlloc listed where ServerArgs is
    # assembled, inline, beside Memory (the plugin adds the same Struct, upstream/fields.py).
    server_args = (package / "srt" / "server_args.py").read_text()
    assert server_args.count("from sglang.srt.arg_groups.fields.kv_alloc import KvAlloc\n") == 1
    namespaces = server_args.split("_INPUT_NAMESPACES = [", 1)[1].split("]", 1)[0]
    assert "    Memory,\n    KvAlloc,\n" in namespaces
    # The checks a field's type cannot make are a resolution step of their own, right after
    # the memory settings' (the step the plugin wraps), and overridable as upstream's steps.
    pipeline = (package / "srt" / "arg_groups" / "pipeline.py").read_text()
    step = (
        "    run_hook(handle_gpu_memory_settings, server_args)\n\n"
        "    from sglang.srt.arg_groups.kv_alloc_hook import handle_kv_alloc\n\n"
        "    run_hook(handle_kv_alloc, server_args)\n"
    )
    assert pipeline.count(step) == 1 and plugin.cli.RESOLUTION_STEP == "handle_gpu_memory_settings"
    overridable = (package / "srt" / "arg_groups" / "resolution_hooks.py").read_text()
    assert '        "handle_gpu_memory_settings",\n        "handle_kv_alloc",\n' in overridable
    # A feature's flags come with it: the shared budget's PR brings its fields (and their
    # parser's import) to the KvAlloc that PR 1 carried without them.
    fields = (package / "srt/arg_groups/fields/kv_alloc.py").relative_to(tmp_path).as_posix()
    budget = next(p for p in series.SERIES if any(x.file == series_prs.FIELDS for x in p.parts))
    at = [_git_show(tmp_path, commit, fields) for commit in commits]
    assert "kv_budget" not in at[0] and "parse_bytes" not in at[0]
    assert at[budget.number - 2] == at[0]
    assert at[budget.number - 1].encode() == (series.SOURCE / series_prs.FIELDS).read_bytes()
    # auto's branch where the mode is decided comes with auto: before it, auto is static.
    auto = next(p for p in series.SERIES if p.slug == "auto-mode")
    decided = (package / series.upstream_path(series_prs.POOL_CONFIG)).relative_to(tmp_path)
    first = next(p.pr.number for p in series.plan() if series_prs.POOL_CONFIG in p.files)
    at = [
        _git_show(tmp_path, commits[n - 1], decided.as_posix())
        for n in range(first, len(commits) + 1)
    ]
    assert first < auto.number and "modes.AUTO" not in at[auto.number - first - 1]
    assert at[auto.number - first].encode() == (series.SOURCE / series_prs.POOL_CONFIG).read_bytes()
    with pytest.raises(series.SeriesError, match="already applied"):
        series.apply(tmp_path, log=lambda _: None)


def _git_show(root: Path, commit: str, path: str) -> str:
    return subprocess.run(
        ["git", "-C", str(root), "show", f"{commit}:{path}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


def test_a_part_is_cut_from_the_earlier_prs_text_or_refused() -> None:
    text = "a = 1\nb: A[\n    x,\n]\nc = 3\n"
    assert (
        series_edits.cut_part(text, series_edits.Part("f", "b: A[", end="c = 3"))
        == "a = 1\nc = 3\n"
    )
    assert series_edits.cut_part(text, series_edits.Part("f", "b: A[")) == "a = 1\n"
    with pytest.raises(series.SeriesError, match="0 lines"):
        series_edits.cut_part(text, series_edits.Part("f", "d = 4"))
    with pytest.raises(series.SeriesError, match="no line"):
        series_edits.cut_part(text, series_edits.Part("f", "b: A[", end="a = 1"))
    with pytest.raises(series.SeriesError, match="2 lines"):
        series_edits.cut_part(text + "a = 1\n", series_edits.Part("f", "a = 1"))


def test_an_insertion_whose_anchor_moved_is_refused(tmp_path: Path) -> None:
    """Upstream moved on (the anchor is gone, or no longer unique): no guess, one line."""
    (tmp_path / "srt").mkdir()
    (tmp_path / "srt" / "x.py").write_text("A = [\n    One,\n]\nB = [\n    One,\n]\n")
    twice = series_edits.Insertion("srt/x.py", "    One,", ("    Two,",), after=True)
    with pytest.raises(series.SeriesError, match="occurs 2 times"):
        series.insert_lines(tmp_path, twice)
    series.insert_lines(tmp_path, series_edits.Insertion(**{**twice.__dict__, "within": "B = ["}))
    assert (tmp_path / "srt" / "x.py").read_text().endswith("B = [\n    One,\n    Two,\n]\n")
    gone = series_edits.Insertion("srt/x.py", "    Three,", ("    Four,",))
    with pytest.raises(series.SeriesError, match="occurs 0 times"):
        series.insert_lines(tmp_path, gone)


def test_apply_refuses_another_version_and_a_tree_without_sglang(tmp_path: Path) -> None:
    package = upstream_copy(tmp_path)
    (package / "_version.py").write_text("__version__ = version = '0.5.22'\n")
    with pytest.raises(series.SeriesError, match="0.5.22"):
        series.apply(package, commit=False)
    with pytest.raises(series.SeriesError, match="no upstream SGLang package"):
        series.apply(tmp_path / "nowhere", commit=False)
    out = subprocess.run(
        [sys.executable, "-m", "sglang_kvalloc_harness.series", "apply", str(tmp_path / "nowhere")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_the_decorator_behaves_as_hook_registrys_wrappers(monkeypatch) -> None:
    from sglang.srt.plugins.hook_decorator import kvalloc_hook

    calls: list[str] = []
    hooks = types.ModuleType("series_test_hooks")

    def before(x: int, y: int = 0):
        calls.append("before")
        return (x + 1,), {"y": y}

    def after(result: int, x: int, y: int = 0) -> int:
        return result * 10

    def around(original, x: int, y: int = 0) -> int:
        return original(x, y=y + 100) + 1

    hooks.before, hooks.after, hooks.around = before, after, around
    monkeypatch.setitem(sys.modules, "series_test_hooks", hooks)

    def add(x: int, y: int = 0) -> int:
        """Adds."""
        return x + y

    assert kvalloc_hook("BEFORE", "series_test_hooks:before")(add)(1, y=2) == 4
    assert kvalloc_hook("AFTER", "series_test_hooks:after")(add)(1, y=2) == 30
    wrapped = kvalloc_hook("AROUND", "series_test_hooks:around")(add)
    assert wrapped(1, y=2) == 104
    assert wrapped.__name__ == "add" and wrapped.__doc__ == "Adds." and wrapped.__wrapped__ is add
    assert calls == ["before"]
    with pytest.raises(ValueError):
        kvalloc_hook("REPLACE", "series_test_hooks:around")


def test_each_prs_tests_are_upstream_style_and_land_in_a_clones_test_dir(tmp_path: Path) -> None:
    """The series' tests (upstream_tests/) name upstream's modules only, register for
    upstream's CPU CI (the CUDA backing's, which needs a GPU, for its CUDA CI, skipped
    without one), and are written into a clone's test/ by their PR (not into a bare
    package directory, which has no test/)."""
    every = [rel for pr in series.SERIES for rel in pr.tests]
    assert len(every) >= 2 and len(set(every)) == len(every)
    for rel in every:
        text = (series.UPSTREAM_TESTS / rel).read_text()
        assert "sglang_kvalloc" not in text, rel
        cuda_only = "register_cuda_ci(" in text and "torch.cuda.is_available()" in text
        assert "register_cpu_ci(" in text or cuda_only, rel
        assert "CustomTestCase" in text, rel
    package = tmp_path / "python" / "sglang"
    package.mkdir(parents=True)
    (tmp_path / "test").mkdir()
    pr = next(pr for pr in series.SERIES if pr.tests)
    written = series.carry_tests(package, pr)
    tests = [p for p in written if p.is_relative_to(tmp_path / "test")]
    assert [p.relative_to(tmp_path / "test").as_posix() for p in tests] == list(pr.tests)
    with pytest.raises(series.SeriesError, match="exists"):
        series.carry_tests(package, pr)
    assert series.carry_tests(tmp_path / "sglang", pr) == []  # a package directory alone


def test_each_pr_has_a_docs_page_in_upstreams_layout_naming_what_the_series_writes(
    tmp_path: Path,
) -> None:
    """One page per PR (upstream_docs/, upstream's docs/advanced_features/ layout): written
    for SGLang's users (nothing of this repository), its Code Reference naming only files
    that the series has written by that PR or that upstream has, and written into a clone's
    docs/ by its PR."""
    written_by: set[str] = set()
    for planned in series.plan():
        pr = planned.pr
        written_by |= {f"python/sglang/{series.upstream_path(rel)}" for rel in planned.files}
        written_by |= {f"test/{rel}" for rel in pr.tests}
        assert len(pr.docs) == 1 and pr.docs[0].startswith("advanced_features/"), pr.slug
        text = (series.UPSTREAM_DOCS / pr.docs[0]).read_text()
        # Upstream's own plugin package (srt/plugins/) may be named; this project may not.
        prose = text.replace("python/sglang/srt/plugins/", "")
        for word in ("sglang_kvalloc", "sglang-kvalloc", "plugin", "upstream_tests"):
            assert word not in prose, (pr.docs[0], word)
        assert text.startswith("# ") and "## Code Reference" in text, pr.docs[0]
        reference = text.split("## Code Reference", 1)[1]
        rows = [line for line in reference.splitlines() if line.startswith("| `")]
        named = [row.split("`")[1] for row in rows]
        assert named, pr.docs[0]
        for path in named:
            upstream_file = (
                path.startswith("python/sglang/")
                and (UPSTREAM / path.removeprefix("python/sglang/")).exists()
            )
            folder = path.endswith("/") and any(w.startswith(path) for w in written_by)
            assert path in written_by or upstream_file or folder, (pr.docs[0], path)
    package = tmp_path / "python" / "sglang"
    package.mkdir(parents=True)
    (tmp_path / "test").mkdir()
    written = series.carry_tests(package, series.SERIES[0])
    assert tmp_path / "docs" / series.SERIES[0].docs[0] in written


def test_a_lazy_import_a_later_part_brings_is_no_forward_reference() -> None:
    """The listing's forward references read each file as its PR writes it: auto's branch
    of `pool_config.py` (and its import of auto's module) comes with auto's PR, so the PR
    that carries the file has no such import; one it has (the budget's) is listed."""
    planned = {p.pr.slug: p for p in series.plan()}
    forward = planned["segmented-kv-mode"].forward
    assert (
        "in_tree/sglang/srt/mem_cache/segmented/pool_config.py",
        "in_tree/sglang/srt/mem_cache/segmented/auto_pools.py",
    ) not in {(rel, dep) for rel, dep, _ in forward}
    assert any(dep.endswith("segmented/kv_budget.py") for _, dep, _ in forward)
