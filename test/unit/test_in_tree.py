"""The modules that would be upstream's (issue 34): ``in_tree/`` holds them at their upstream
paths, the plugin imports them by their upstream names, and they are upstream code.

The series copies them byte for byte (test_series.py); here: each imports under its upstream
name from this package's file, in every process where the package is installed; none imports
this project (they could not be merged if they did); upstream 0.5.23 has none of those paths
(the series would overwrite upstream's file); upstream's own files win over them; and they are
formatted as upstream's pre-commit formats (black at 88 columns, isort)."""

from __future__ import annotations

import ast
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import sglang

from sglang_kvalloc import in_tree_finder

UPSTREAM = Path(sglang.__file__).resolve().parent
MODULES = in_tree_finder.in_tree_modules()
FILES = sorted(in_tree_finder.IN_TREE.rglob("*.py"))


def test_every_in_tree_module_imports_under_its_upstream_name() -> None:
    assert "sglang.srt.mem_cache.segmented.allocator" in MODULES and len(MODULES) >= 11
    for name in MODULES:
        module = importlib.import_module(name)
        path = Path(module.__file__ or "").resolve()
        assert path.is_relative_to(in_tree_finder.IN_TREE), (name, path)


def test_a_fresh_process_resolves_them_without_importing_the_plugin() -> None:
    """The bootstrap .pth installs the finder: an upstream-only script imports them too."""
    code = (
        "import sys; import sglang.srt.mem_cache.segmented.buffers as m; "
        "print(m.__file__); print('sglang_kvalloc.upstream.plugin' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    file, plugin_loaded = out.stdout.split()
    assert Path(file).resolve().is_relative_to(in_tree_finder.IN_TREE)
    assert plugin_loaded == "False"


def test_in_tree_files_import_nothing_of_this_project() -> None:
    ours = ("sglang_kvalloc", "sglang_kvalloc_harness")
    found = []
    for path in FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else ["(relative)"]
            found += [(path.name, n) for n in names if n.split(".")[0] in ours + ("(relative)",)]
    assert found == []


def test_upstream_has_none_of_their_paths() -> None:
    clashes = [name for name in MODULES if in_tree_finder.in_tree_file(name) and _upstream(name)]
    assert clashes == []


def _upstream(name: str) -> bool:
    base = UPSTREAM.joinpath(*name.split(".")[1:])
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def test_upstreams_own_files_win(tmp_path: Path) -> None:
    """The finder is consulted after the path finder: a tree where the series is applied
    imports its own copy."""
    ours = next(
        i for i, f in enumerate(sys.meta_path) if isinstance(f, in_tree_finder.InTreeFinder)
    )
    assert ours > sys.meta_path.index(importlib.machinery.PathFinder)
    package = tmp_path / "sglang"
    (package / "srt" / "mem_cache" / "segmented").mkdir(parents=True)
    for rel in ("__init__.py", "srt/__init__.py"):
        (package / rel).write_text("")
    (package / "srt" / "mem_cache" / "segmented" / "__init__.py").write_text("APPLIED = 1\n")
    code = "import sglang.srt.mem_cache.segmented as m; print(m.APPLIED, m.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", str(package / "srt/mem_cache/segmented/__init__.py")]


def test_formatted_as_upstream_formats() -> None:
    """black at 88 columns and isort with sglang first-party (in_tree/ruff.toml): ruff's
    formatter is black's style; a diff here is a file upstream's pre-commit would rewrite."""
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    files = [str(f) for f in FILES]
    fmt = subprocess.run([ruff, "format", "--check", *files], capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr
    lint = subprocess.run(
        [ruff, "check", "--select", "I,F", *files], capture_output=True, text=True
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    width = [
        (f.name, i)
        for f in FILES
        for i, line in enumerate(f.read_text().splitlines(), 1)
        if len(line) > 88 and not line.lstrip().startswith("#") and '"' not in line
    ]
    assert width == []


def test_the_planners_segment_rules_load_without_upstream() -> None:
    """The planner's CLI runs where torch cannot load: the geometry it uses imports only the
    standard library, and loads from the same file without upstream's packages."""
    path = in_tree_finder.in_tree_file("sglang.srt.mem_cache.segmented.geometry")[0]
    imported = {
        (a.name if isinstance(node, ast.Import) else node.module or "").split(".")[0]
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for a in node.names
    }
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}
    name, file = _without_upstream(
        "from sglang_kvalloc.in_tree_finder import standalone\n"
        "m = standalone('sglang.srt.mem_cache.segmented.geometry')\n"
        "print(m.__name__, m.__file__)\n"
    ).split()
    assert name == "sglang_kvalloc.standalone.sglang.srt.mem_cache.segmented.geometry"
    assert Path(file) == path


def test_the_budget_cli_runs_without_upstream() -> None:
    """`python -m sglang_kvalloc.budget` reads the in-tree ledger without loading SGLang or
    torch (an operator's command; `import sglang` takes seconds and loads torch)."""
    out = _without_upstream(
        "from sglang_kvalloc import budget\n"
        "print(budget._ledger.__name__)\n"
        "sys.exit(budget.main(['list']))\n"
    )
    assert out.split("\n")[0].startswith("sglang_kvalloc.standalone.")


def _without_upstream(code: str) -> str:
    """What ``code`` prints in a fresh interpreter where importing sglang or torch fails."""
    prelude = "import sys\nsys.modules['sglang'] = sys.modules['torch'] = None\n"
    out = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_no_in_tree_module_is_over_600_lines() -> None:
    long = {f.name: n for f in FILES if (n := len(f.read_text().splitlines())) > 600}
    assert long == {}
