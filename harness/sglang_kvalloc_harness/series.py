"""The upstream PR series: apply this project's hooks to an upstream SGLang tree as direct edits.

    python -m sglang_kvalloc_harness.series list
    python -m sglang_kvalloc_harness.series apply PATH [--no-commit] [--force]

PATH is the user's copy of upstream 0.5.23: a clone (``PATH/python/sglang``), the package
directory itself (``.../site-packages/sglang``), or a folder holding it. Each pull request of
`SERIES` is applied in merge order:

- this project's modules that the PR's hooks need (their import closure, lazy imports too),
  all of them ``in_tree/`` files (which the plugin imports through `in_tree_finder`, itself
  not carried), copied byte for byte to their upstream paths (``srt/mem_cache/segmented/``
  ...); a module outside ``in_tree/`` in a PR's closure is an error;
- each upstream function a hook of the PR targets (``upstream/plugin.py``) calls that hook's
  function inline where its shape allows (BEFORE hooks first, AFTER hooks last:
  `series_edits.inline_shape`), else gets one decorator line, ``@kvalloc_hook("AROUND",
  "sglang.srt.mem_cache.segmented.attention_graph_buffers:around_capture")``; found by
  parsing the file (no line numbers, no upstream text kept here).

In a git work tree each PR becomes one commit. The repository holds no upstream source: the
tool edits the user's files. The product's early-plugin hook, the planner and budget CLIs and
this harness (the CPU-kernel shim, the demo, the test helpers) are not part of the series.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import sglang

from sglang_kvalloc import in_tree_finder
from sglang_kvalloc.upstream import plugin
from sglang_kvalloc.upstream.inline import INLINE_ARGUMENT
from sglang_kvalloc_harness.series_edits import (
    IMPORT_LINE,  # noqa: F401 - re-exported: what tests look for
    Edit,
    SeriesError,
    _find_def,  # noqa: F401 - re-exported: what tests look for
    _is_type_checking,
    _module_level,
    _target_file,
    cut_part,
    edit_file,
    inline_form,
    insert_lines,
)
from sglang_kvalloc_harness.series_prs import DECORATOR_MODULE, IN_TREE, SERIES, PullRequest

PACKAGE = "sglang_kvalloc"
UPSTREAM_VERSION = "0.5.23"
SOURCE = Path(plugin.__file__).resolve().parents[1]  # the product package, python/sglang_kvalloc
# The series' tests in upstream's form, at their paths under upstream's test/, and its docs
# pages, at their paths under upstream's docs/.
UPSTREAM_TESTS = SOURCE.parents[1] / "upstream_tests"
UPSTREAM_DOCS = SOURCE.parents[1] / "upstream_docs"
# Never part of the series: the plugin's own layer (replaced by the edits), the import hook
# that loads plugins early (upstream loads its own), and the CLIs outside the server with the
# planner they run.
NOT_IN_SERIES = (
    "upstream/",  # the plugin's registration, wrappers, fields and resolution step: the series
    # writes the calls, the fields and the step inline instead
    "early_plugins.py",
    "on_import.py",  # the plugin's modules hooked on import; the series edits them inline
    "plan.py",
    "budget.py",
    "core/",  # the capacity planner (its CLI's estimate, outside any server)
    "in_tree_finder.py",
    "__init__.py",  # the plugin package's: it installs in_tree_finder
)
UPSTREAM_ROOT = "sglang.srt."
# The installed upstream (the series' version): where each hook's call goes is read there.
INSTALLED = Path(sglang.__file__).resolve().parent


@dataclass
class PlannedPR:
    pr: PullRequest
    files: list[str] = field(default_factory=list)  # package-relative, new in this PR
    edits: list[Edit] = field(default_factory=list)
    # Imports inside functions of this PR's files that reach a later PR's file: code paths
    # (segmented on a GPU, say) that later PR completes. (file, imported file, its PR).
    forward: list[tuple[str, str, int]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Planning: which files and edits each PR carries
# --------------------------------------------------------------------------------------------


def _excluded(rel: str) -> bool:
    return any(rel == x or (x.endswith("/") and rel.startswith(x)) for x in NOT_IN_SERIES)


def _module_file(module: str) -> str | None:
    """Package-relative file of a ``sglang_kvalloc.*`` module or of an upstream name served
    from ``in_tree/``, or None."""
    if module.startswith(UPSTREAM_ROOT):
        found = in_tree_finder.in_tree_file(module)
        return str(found[0].relative_to(SOURCE)) if found is not None else None
    parts = module.split(".")[1:]
    if not parts:
        return "__init__.py"
    for rel in ("/".join(parts) + ".py", "/".join(parts) + "/__init__.py"):
        if (SOURCE / rel).is_file():
            return rel
    return None


def _imports(rel: str, *, lazy: bool = False, at: int | None = None) -> set[str]:
    """Package-relative files a module imports from this package at import time (``lazy``:
    also those imported inside functions); ``at``: as the file is once PR ``at`` is applied
    (without the parts later PRs bring)."""
    text = (SOURCE / rel).read_text()
    for pr in SERIES if at is not None else ():
        for part in pr.parts if pr.number > at else ():
            if part.file == rel:
                text = cut_part(text, part)
    tree = ast.parse(text)
    found: set[str] = set()
    nodes = _run_time_nodes(tree) if lazy else _module_level(tree.body)
    for node in nodes:
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name == PACKAGE or name.startswith((PACKAGE + ".", UPSTREAM_ROOT)):
                target = _module_file(name)
                if target is not None:
                    found.add(target)
    return found


def _run_time_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node but those of ``if TYPE_CHECKING:`` blocks."""
    out: list[ast.AST] = []
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        todo.extend(
            child
            for child in ast.iter_child_nodes(node)
            if not (isinstance(child, ast.stmt) and _is_type_checking(child))
        )
    return out


def _closure(roots: set[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.add(rel)
        # Every package a module sits in comes with it (its __init__).
        parts = rel.split("/")[:-1]
        # (an in_tree/ file's packages are upstream's, from in_tree/sglang/ down)
        for i in range(2 if rel.startswith(IN_TREE) else 0, len(parts) + 1):
            init = "/".join(parts[:i] + ["__init__.py"])
            if (SOURCE / init).is_file() and init not in seen:
                todo.append(init)
        todo.extend(_imports(rel) - seen)
    return seen


def _hook_matches(pattern: str, hook: object) -> bool:
    module = getattr(hook, "__module__", "").rpartition(".")[2]
    name = getattr(hook, "__name__", "")
    want_module, _, want_name = pattern.partition(".")
    return module == want_module and want_name in ("*", name)


def plan(package: Path = INSTALLED) -> list[PlannedPR]:
    """Every PR's new files and edits, in merge order, each inline call shaped by the function
    as it is in ``package`` (the tree the series is applied to). Every hook of
    upstream/plugin.py lands in exactly one PR (SeriesError otherwise)."""
    hooks = plugin.hooks()
    targets = [(target, hook) for target, hook, _ in hooks]
    planned = [PlannedPR(pr) for pr in SERIES]
    for target, hook, hook_type in hooks:
        owners = [p for p in planned if any(_hook_matches(x, hook) for x in p.pr.hooks)]
        if len(owners) != 1:
            raise SeriesError(
                f"hook {hook.__module__}.{hook.__name__} on {target} belongs to "
                f"{len(owners)} PRs of the series (must be exactly one)"
            )
        module = hook.__module__
        edit = Edit(target, hook_type, f"{module}:{hook.__name__}")
        form = inline_form(package, edit, hook, targets)
        assigns = getattr(hook, INLINE_ARGUMENT, None) if form == "argument" else None
        owners[0].edits.append(dataclasses.replace(edit, form=form, assigns=assigns))
    carried: set[str] = set()
    for p in planned:
        roots = {_module_file(e.hook.partition(":")[0]) for e in p.edits}
        roots |= set(p.pr.files)
        if any(not e.inline for e in p.edits):  # the first PR that decorates brings the decorator
            roots.add(DECORATOR_MODULE)
        roots.discard(None)  # type: ignore[arg-type]
        new = sorted(r for r in _closure(roots) if not _excluded(r)) if roots else []  # type: ignore[arg-type]
        for rel in new:
            if not rel.startswith(IN_TREE):
                raise SeriesError(f"PR {p.pr.number} needs {rel}, which is not in {IN_TREE}")
            if rel not in carried:
                carried.add(rel)
                p.files.append(rel)
    owner = {rel: p.pr.number for p in planned for rel in p.files}
    for p in planned:
        for part in p.pr.parts:
            if owner.get(part.file, p.pr.number) >= p.pr.number:
                raise SeriesError(
                    f"PR {p.pr.number}: a part of {part.file}, which no earlier PR carries"
                )
    for p in planned:
        for rel in p.files:
            if rel.endswith(".py"):
                for dep in sorted(_imports(rel, lazy=True, at=p.pr.number)):
                    if owner.get(dep, 0) > p.pr.number:
                        p.forward.append((rel, dep, owner[dep]))
    unowned = sorted(
        rel
        for rel in _closure({str(f.relative_to(SOURCE)) for f in SOURCE.rglob("*.py")})
        if not _excluded(rel) and rel not in owner
    )
    if unowned:
        raise SeriesError(f"modules in no PR of the series: {', '.join(unowned)}")
    return planned


def code_lines(text: str) -> int:
    """Non-blank lines that are not comments (docstrings count: they are code to review)."""
    return sum(1 for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#"))


# --------------------------------------------------------------------------------------------
# Applying
# --------------------------------------------------------------------------------------------


def find_package(path: Path) -> Path:
    """The ``sglang`` package directory in what the user pointed at."""
    for candidate in (path, path / "sglang", path / "python" / "sglang"):
        if (candidate / "srt" / "server_args.py").is_file():
            return candidate.resolve()
    raise SeriesError(
        f"{path}: no upstream SGLang package here (looked for srt/server_args.py in it, "
        "sglang/ and python/sglang/)"
    )


def upstream_version(package: Path) -> str:
    """The tree's version: the generated ``_version.py`` (installed or built), else the
    installed distribution's metadata beside it, else a clone's ``python/pyproject.toml``."""
    sources = [(package / "_version.py", r"__version__\s*=\s*(?:version\s*=\s*)?['\"]([^'\"]+)")]
    sources += [
        (m, r"(?m)^Version:\s*(\S+)") for m in package.parent.glob("sglang-*.dist-info/METADATA")
    ]
    sources.append((package.parent / "pyproject.toml", r'(?m)^version\s*=\s*"([^"]+)"'))
    for path, pattern in sources:
        if path.is_file():
            match = re.search(pattern, path.read_text())
            if match:
                return match.group(1)
    return "unknown"


def upstream_path(rel: str) -> str:
    """Where one of this project's ``in_tree/`` files goes in upstream's package."""
    return rel.removeprefix(IN_TREE)


@functools.cache
def carried_text(rel: str) -> str:
    """The text one of this project's ``in_tree/`` files has in upstream's tree: as it is
    (written as upstream code)."""
    return (SOURCE / rel).read_text()


def text_at(rel: str, number: int) -> str:
    """The text one of this project's files has once PR ``number`` is applied: what upstream's
    tree gets (`carried_text`) without the parts a later PR brings."""
    text = carried_text(rel)
    for pr in SERIES:
        if pr.number > number:
            for part in pr.parts:
                if part.file == rel:
                    text = cut_part(text, part)
    return text


def carry_file(package: Path, rel: str, number: int) -> Path:
    """Write one of this project's files into the upstream tree as PR ``number`` has it
    (`text_at`): an ``in_tree/`` file byte for byte once every part is in, another with its
    imports renamed."""
    dest = package / upstream_path(rel)
    src = SOURCE / rel
    if rel.startswith(IN_TREE) and dest.exists():
        raise SeriesError(f"{dest} exists in upstream's tree: the series would overwrite it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if rel.startswith(IN_TREE) or src.suffix == ".py":
        dest.write_text(text_at(rel, number))
    else:
        shutil.copyfile(src, dest)
    return dest


def carry_parts(package: Path, pr: PullRequest) -> list[Path]:
    """Write the parts ``pr`` brings into the files an earlier PR carried."""
    written = []
    for rel in dict.fromkeys(part.file for part in pr.parts):
        dest = package / upstream_path(rel)
        if not dest.is_file():
            raise SeriesError(f"{dest}: a part of PR {pr.number} for a file not carried yet")
        dest.write_text(text_at(rel, pr.number))
        written.append(dest)
    return written


def carry_tests(package: Path, pr: PullRequest) -> list[Path]:
    """Write ``pr``'s tests and docs pages into the clone's ``test/`` and ``docs/``
    (``<clone>/python/sglang`` is the package); a package directory alone has no place for
    them (its user reads them in ``upstream_tests/`` and ``upstream_docs/``)."""
    clone = package.parents[1]
    if package.parent.name != "python" or not (clone / "test").is_dir():
        return []
    written = []
    for source, folder, rels in (
        (UPSTREAM_TESTS, "test", pr.tests),
        (UPSTREAM_DOCS, "docs", pr.docs),
    ):
        for rel in rels:
            dest = clone / folder / rel
            if dest.exists():
                raise SeriesError(
                    f"{dest} exists in upstream's tree: the series would overwrite it"
                )
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / rel, dest)
            written.append(dest)
    return written


def _git_root(package: Path) -> Path | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(package), "rev-parse", "--show-toplevel"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return Path(out.stdout.strip())


@functools.cache
def _identity(root: Path) -> tuple[str, ...]:
    """A committer for the series' commits where the repository names none."""
    named = subprocess.run(["git", "-C", str(root), "config", "user.name"], capture_output=True)
    if named.returncode == 0:
        return ()
    return ("-c", "user.name=sglang-kvalloc", "-c", "user.email=sglang-kvalloc@localhost")


def _git(root: Path, *args: str) -> str:
    cmd = ["git", *_identity(root), "-C", str(root), *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def commit_message(p: PlannedPR) -> str:
    body = [p.pr.summary, ""]
    calls = [e for e in p.edits if e.inline]
    if calls:
        body.append("Upstream functions calling the change inline (each replaces a plugin hook):")
        body += [f"- {e.target} ({e.hook_type}: {e.hook})" for e in calls]
    if len(calls) < len(p.edits):
        body.append("Upstream functions decorated (each replaces a plugin hook):")
        body += [f"- {e.target} ({e.hook_type}: {e.hook})" for e in p.edits if not e.inline]
    if p.pr.insertions:
        body.append("Lines written inline into upstream's code:")
        body += [f"- {i.file}: {' / '.join(x.strip() for x in i.lines)}" for i in p.pr.insertions]
    if p.files:
        body.append("")
        body.append("New files: " + ", ".join(upstream_path(rel) for rel in p.files))
    return f"[kv-alloc-mode {p.pr.number}/{len(SERIES)}] {p.pr.title}\n\n" + "\n".join(body)


def apply(path: Path, *, commit: bool = True, force: bool = False, log=print) -> list[str]:
    """Apply the whole series to the tree at ``path``; returns the commits made (if any)."""
    package = find_package(path)
    version = upstream_version(package)
    if version != UPSTREAM_VERSION and not force:
        raise SeriesError(
            f"{package} is SGLang {version}; the series is for {UPSTREAM_VERSION} (--force to try)"
        )
    first = package / upstream_path(SERIES[0].files[0])  # the flag's fields
    if first.exists():
        raise SeriesError(f"{first} exists: the series is already applied")
    root = _git_root(package) if commit else None
    if root is not None and _git(root, "status", "--porcelain", "--", str(package)).strip():
        raise SeriesError(f"{package} has uncommitted changes; commit or stash them first")
    commits: list[str] = []
    for p in plan(package):
        by_file: dict[Path, list[tuple[list[str], Edit]]] = {}
        for edit in p.edits:
            file, attrs = _target_file(package, edit.target)
            by_file.setdefault(file, []).append((attrs, edit))
        for rel in p.files:
            carry_file(package, rel, p.pr.number)
        carry_parts(package, p.pr)
        for file, edits in by_file.items():
            edit_file(file, edits)
        for insertion in p.pr.insertions:
            insert_lines(package, insertion)
        tests = carry_tests(package, p.pr)
        calls = sum(e.inline for e in p.edits)
        log(
            f"[series] PR {p.pr.number}: {p.pr.title}: {len(p.files)} new file(s), "
            f"{calls} inline call(s) and {len(p.edits) - calls} decorated function(s) in "
            f"{len(by_file)} upstream file(s), {len(p.pr.insertions)} inline insertion(s), "
            f"{len(tests)} test and docs file(s)"
        )
        if root is not None:
            _git(root, "add", "-A", "--", str(package), *map(str, tests))
            _git(root, "commit", "-q", "-m", commit_message(p))
            commits.append(_git(root, "rev-parse", "--short", "HEAD").strip())
    return commits


@dataclass(frozen=True)
class PrSize:
    """What one PR adds, in code lines (non-blank, non-comment): files at their own upstream
    paths (byte for byte from ``in_tree/``), the lines it brings to files an earlier PR
    carries, the upstream functions that call the change inline, and those it decorates
    (one added line each)."""

    number: int
    slug: str
    at_upstream_paths: tuple[int, int]  # (files, code lines)
    inline_calls: int
    decorated: int
    inserted: int  # lines written inline into upstream's files


def sizes() -> list[PrSize]:
    """Every PR's size, computed from the plan (what `apply` writes)."""
    out = []
    for p in plan():
        n = p.pr.number
        own = [code_lines(text_at(r, n)) for r in p.files]
        # a part's lines count as code lines of the PR, in no new file
        own += [added for _, added in part_lines(p.pr)]
        inserted = sum(len(i.lines) for i in p.pr.insertions)
        out.append(
            PrSize(p.pr.number, p.pr.slug, (len(p.files), sum(own)),
                   sum(e.inline for e in p.edits), sum(not e.inline for e in p.edits), inserted)
        )  # fmt: skip
    return out


def part_lines(pr: PullRequest) -> list[tuple[str, int]]:
    """The code lines each file ``pr`` brings parts of gains with it."""
    files = dict.fromkeys(part.file for part in pr.parts)
    return [
        (rel, code_lines(text_at(rel, pr.number)) - code_lines(text_at(rel, pr.number - 1)))
        for rel in files
    ]


def describe() -> str:
    """The series as text: per PR, files with their sizes and the upstream functions it
    edits (inline calls, decorations)."""
    out = []
    for p in plan():
        sizes = [(rel, code_lines(text_at(rel, p.pr.number))) for rel in p.files]
        out.append(f"PR {p.pr.number}/{len(SERIES)} {p.pr.slug}: {p.pr.title}")
        out.append(f"  {p.pr.summary}")
        total = sum(n for rel, n in sizes if rel.endswith(".py"))
        out.append(f"  new files ({total} code lines):")
        out += [f"    {upstream_path(rel)} ({n})" for rel, n in sizes]
        calls = [e for e in p.edits if e.inline]
        out.append(f"  upstream functions calling it inline ({len(calls)}):")
        out += [f"    {e.target}  [{e.hook_type}: {e.function}]" for e in calls]
        decorated = [e for e in p.edits if not e.inline]
        out.append(f"  upstream functions decorated ({len(decorated)}):")
        out += [f"    {e.target}  [{e.hook_type}]" for e in decorated]
        if p.pr.tests:
            out.append(f"  tests, in upstream's test/ ({len(p.pr.tests)}):")
            out += [f"    {rel}" for rel in p.pr.tests]
        if p.pr.docs:
            out.append(f"  docs pages, in upstream's docs/ ({len(p.pr.docs)}):")
            out += [f"    {rel}" for rel in p.pr.docs]
        if p.pr.parts:
            out.append("  lines it brings to files an earlier PR carries:")
            out += [f"    {upstream_path(rel)} (+{n})" for rel, n in part_lines(p.pr)]
        if p.pr.insertions:
            out.append(f"  lines written inline ({len(p.pr.insertions)}):")
            out += [f"    {i.file}: {' / '.join(x.strip() for x in i.lines)}"
                    for i in p.pr.insertions]  # fmt: skip
        if p.forward:
            out.append("  imports inside functions that a later PR provides:")
            out += [f"    {rel} -> {dep} (PR {n})" for rel, dep, n in p.forward]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sglang_kvalloc_harness.series",
        description="Apply the --kv-alloc-mode series to an upstream SGLang 0.5.23 tree.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="print the series: PRs, new files, edited functions")
    tests_p = sub.add_parser("tests", help="print one PR's test files (under upstream_tests/)")
    tests_p.add_argument("number", type=int, help="the PR's number in merge order")
    check_p = sub.add_parser(
        "check", help="try every edit of the series on a tree, one at a time (writes nothing)"
    )
    check_p.add_argument("path", type=Path, help="upstream clone, sglang package dir, or parent")
    apply_p = sub.add_parser("apply", help="apply the series to an upstream tree")
    apply_p.add_argument("path", type=Path, help="upstream clone, sglang package dir, or parent")
    apply_p.add_argument("--no-commit", action="store_true", help="edit only, no git commits")
    apply_p.add_argument("--force", action="store_true", help="apply to another version")
    args = parser.parse_args(argv)
    if args.command == "list":
        print(describe())
        return 0
    if args.command == "tests":
        if not 1 <= args.number <= len(SERIES):
            parser.error(f"no PR {args.number}; the series has {len(SERIES)}")
        print("\n".join(str(UPSTREAM_TESTS / rel) for rel in SERIES[args.number - 1].tests))
        return 0
    if args.command == "check":
        from sglang_kvalloc_harness import series_check

        try:
            findings = series_check.check(args.path)
        except SeriesError as exc:
            parser.exit(1, f"error: {exc}\n")
        print(series_check.report(findings))
        return 1 if any(f.problem for f in findings) else 0
    try:
        commits = apply(args.path, commit=not args.no_commit, force=args.force)
    except SeriesError as exc:
        parser.exit(1, f"error: {exc}\n")
    if commits:
        print(f"[series] {len(commits)} commits: {' '.join(commits)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
