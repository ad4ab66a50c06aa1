"""What the series needs of an upstream tree, checked one edit at a time: ``python -m
sglang_kvalloc_harness.series check TREE``.

`apply` stops at the first edit a tree refuses. Rebasing onto another upstream (its main, a
later tag) needs every one of them: each function a hook edits (its file, the function, the
shape of the inline call there against the one planned on 0.5.23), each line written next to
an anchor, each new file, each tried alone on a scratch copy of its one file. Nothing is
written to the tree.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sglang_kvalloc.upstream import plugin
from sglang_kvalloc_harness import series
from sglang_kvalloc_harness.series_edits import (
    Edit,
    Insertion,
    SeriesError,
    _target_file,
    edit_file,
    inline_form,
    insert_lines,
)


@dataclass(frozen=True)
class Finding:
    """One thing the series needs of the tree and what the tree says to it."""

    pr: int
    kind: str  # "edit", "insertion" or "new file"
    what: str
    problem: str  # "" where the tree allows it


def check(path: Path) -> list[Finding]:
    """Every edit, insertion and new file of the series against the tree at ``path``."""
    package = series.find_package(path)
    targets = [(t, h) for t, h, _ in plugin.hooks()]
    hooks = {(t, getattr(h, "__name__", "")): h for t, h in targets}
    findings: list[Finding] = []
    with tempfile.TemporaryDirectory(prefix="series-check-") as scratch:
        for planned in series.plan():  # the forms planned on the installed 0.5.23
            number = planned.pr.number
            for edit in planned.edits:
                what = f"{edit.target} [{edit.hook_type}: {edit.function}]"
                findings.append(
                    Finding(
                        number, "edit", what, _edit_problem(package, edit, hooks, targets, scratch)
                    )
                )
            for insertion in planned.pr.insertions:
                what = f"{insertion.file}: next to {insertion.anchor.strip()!r}"
                problem = _insertion_problem(package, insertion, scratch)
                findings.append(Finding(number, "insertion", what, problem))
            for rel in planned.files:
                dest = package / series.upstream_path(rel)
                problem = "exists in the tree" if dest.exists() else ""
                findings.append(Finding(number, "new file", series.upstream_path(rel), problem))
    return findings


def _edit_problem(
    package: Path,
    edit: Edit,
    hooks: dict[tuple[str, str], object],
    targets: list[tuple[str, object]],
    scratch: str,
) -> str:
    try:
        file, attrs = _target_file(package, edit.target)
        form = inline_form(
            package,
            dataclasses.replace(edit, form=None),
            hooks[(edit.target, edit.function)],
            targets,
        )
        copy = Path(tempfile.mkdtemp(dir=scratch)) / file.name
        shutil.copyfile(file, copy)
        edit_file(copy, [(attrs, dataclasses.replace(edit, form=form))])
    except SeriesError as exc:
        return str(exc)
    if form != edit.form:
        shapes = f"{edit.form or 'decorator'} on 0.5.23, {form or 'decorator'} here"
        return f"the function changed shape: the call goes as a {shapes}"
    return ""


def _insertion_problem(package: Path, insertion: Insertion, scratch: str) -> str:
    source = package / insertion.file
    if not source.is_file():
        return f"{insertion.file} is not in the tree"
    copy = Path(tempfile.mkdtemp(dir=scratch))
    (copy / insertion.file).parent.mkdir(parents=True)
    shutil.copyfile(source, copy / insertion.file)
    try:
        insert_lines(copy, insertion)
    except SeriesError as exc:
        return str(exc)
    return ""


def report(findings: list[Finding]) -> str:
    """The findings as text: the problems first, then the count of what the tree allows."""
    bad = [f for f in findings if f.problem]
    lines = [f"PR {f.pr} {f.kind}: {f.what}: {f.problem}" for f in bad]
    lines.append(f"{len(findings) - len(bad)} of {len(findings)} checks pass on this tree")
    return "\n".join(lines)
