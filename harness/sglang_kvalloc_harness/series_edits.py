"""How the upstream PR series writes its edits into upstream's files, found by parsing them.

A hook of the plugin becomes, in upstream's tree, either an inline call in the function it
targets (BEFORE: the first statement; AFTER: after the last one, or around the function's one
final ``return``), calling the very function the plugin registers; or, where the function's
shape allows neither, a decorator naming that function. Lines a PR writes elsewhere (a field
listed where ServerArgs is assembled) are `Insertion`s next to an anchor line.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

IMPORT_LINE = "from sglang.srt.plugins.hook_decorator import kvalloc_hook"
# Upstream's formatter (black, pre-commit) wraps at 88 columns.
LINE_LIMIT = 88
RESULT = "result"
BUILT = "built"


class SeriesError(RuntimeError):
    """The series cannot be applied to the tree given (one line for the user)."""


@dataclass(frozen=True)
class Insertion:
    """Lines a PR writes into an upstream function or list, inline: next to ``anchor``, a
    line of ``file`` (a path in the ``sglang`` package) that occurs exactly once, or the first
    one after ``within`` (a line that occurs exactly once) where that is given."""

    file: str
    anchor: str
    lines: tuple[str, ...]
    after: bool = False
    within: str | None = None


@dataclass(frozen=True)
class Part:
    """Lines of a file that an earlier PR carries which come with this PR: from the line
    ``first`` up to the line ``end`` (not included; None: to the end of the file), each
    matched whole and ``first`` only once. Earlier PRs write the file without them, so each
    PR brings its own lines (the flags of a feature with the feature)."""

    file: str  # package-relative, as PullRequest.files names files
    first: str
    end: str | None = None


@dataclass(frozen=True)
class Edit:
    """One hook of the plugin written into the upstream function it targets: an inline call
    (``inline``) or a decoration."""

    target: str  # dotted upstream path, as upstream/plugin.py names it
    hook_type: str
    hook: str  # "module:function" in the upstream tree
    # Where the inline call goes (`inline_shape`); None: a decoration.
    form: str | None = None
    # The parameters an "argument" call assigns.
    assigns: tuple[str, ...] | None = None

    @property
    def inline(self) -> bool:
        return self.form is not None

    @property
    def line(self) -> str:
        return f'@kvalloc_hook("{self.hook_type}", "{self.hook}")'

    @property
    def function(self) -> str:
        return self.hook.partition(":")[2]


def _is_type_checking(node: ast.stmt) -> bool:
    """An ``if TYPE_CHECKING:`` block: imports for type checkers only, never run."""
    test = getattr(node, "test", None)
    name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
    return isinstance(node, ast.If) and name == "TYPE_CHECKING"


def _module_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """Statements run at import: the module body and its if/try blocks, not function bodies
    (nor ``if TYPE_CHECKING:`` blocks)."""
    out: list[ast.stmt] = []
    for node in body:
        if _is_type_checking(node):
            continue
        out.append(node)
        if isinstance(node, (ast.If, ast.Try)):
            for block in (node.body, node.orelse, getattr(node, "finalbody", [])):
                out.extend(_module_level(block))
            for handler in getattr(node, "handlers", []):
                out.extend(_module_level(handler.body))
    return out


def _target_file(package: Path, target: str) -> tuple[Path, list[str]]:
    """Upstream file defining ``target`` and the attribute path inside it."""
    parts = target.split(".")
    if parts[0] != "sglang":
        raise SeriesError(f"hook target {target} is not in the sglang package")
    for cut in range(len(parts) - 1, 1, -1):
        candidate = package.joinpath(*parts[1:cut]).with_suffix(".py")
        if candidate.is_file():
            return candidate, parts[cut:]
    raise SeriesError(f"{target}: no file for it under {package}")


def _find_def(tree: ast.Module, attrs: list[str]) -> ast.FunctionDef | ast.AsyncFunctionDef:
    """The one definition of ``attrs`` (class nesting, then the function), wherever it sits
    (also under ``if`` / ``try`` blocks of the module or the class)."""
    scopes: list[list[ast.stmt]] = [tree.body]
    for i, name in enumerate(attrs):
        last = i == len(attrs) - 1
        kinds = (ast.FunctionDef, ast.AsyncFunctionDef) if last else (ast.ClassDef,)
        found = [
            n
            for body in scopes
            for n in _module_level(body)
            if isinstance(n, kinds) and n.name == name
        ]
        if len(found) != 1:
            raise SeriesError(
                f"{'.'.join(attrs)}: found {len(found)} definitions of {name!r} (expected one)"
            )
        if last:
            return found[0]  # type: ignore[return-value]
        scopes = [found[0].body]  # type: ignore[union-attr]
    raise AssertionError("unreachable")


def _import_line_index(tree: ast.Module) -> int:
    """0-based line index where the decorator import goes: after the module docstring and
    ``from __future__`` imports."""
    end = 0
    for node in tree.body:
        is_doc = (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        )
        is_future = isinstance(node, ast.ImportFrom) and node.module == "__future__"
        if (is_doc and end == 0) or is_future:
            end = node.end_lineno or node.lineno
        else:
            break
    return end


def _returns(node: ast.AST) -> list[ast.Return]:
    """The ``return`` statements of a function's own body (not of functions nested in it)."""
    out: list[ast.Return] = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        if isinstance(child, ast.Return):
            out.append(child)
        out.extend(_returns(child))
    return out


def _false_or_gated(value: ast.expr | None, gated: frozenset[str]) -> bool:
    """``value`` is the constant False, or a call ``self.<name>(...)`` with ``name`` gated."""
    if isinstance(value, ast.Constant):
        return value.value is False
    return (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Attribute)
        and isinstance(value.func.value, ast.Name)
        and value.func.value.id == "self"
        and value.func.attr in gated
    )


def inline_shape(
    node: ast.FunctionDef | ast.AsyncFunctionDef,
    hook_type: str,
    around_form: str | None = None,
    assigns: tuple[str, ...] | None = None,
    passes_false: bool = False,
    gated: frozenset[str] = frozenset(),
) -> str | None:
    """Where an inline call of a ``hook_type`` hook goes in ``node``: "start" (BEFORE),
    "end" (AFTER, a function with no ``return``), "return" (AFTER, one ``return`` that is the
    body's last statement), "instead" (an AROUND hook made by `inline.instead`: first, returning
    what it built), "skip" (one made by `inline.done_instead`, in a function that returns
    nothing: first, returning where it did the work), "then" (one made by `inline.then`: the
    one last ``return`` returns what it gives; with ``passes_false``, also where every other
    ``return`` returns False or what a method of ``self`` named in ``gated``, which the same
    hook amends, returns),
    "argument" (one made by `inline.argument`: first, assigning parameters of the function's
    own); None where an inline call could miss a path (a decoration then)."""
    returns = _returns(node)
    final_only = len(returns) == 1 and returns[0] is node.body[-1] and returns[0].value is not None
    if hook_type == "BEFORE":
        return "start"
    if hook_type == "AFTER":
        return "end" if not returns else "return" if final_only else None
    if hook_type == "AROUND" and around_form == "instead":
        return "instead"
    if hook_type == "AROUND" and around_form == "skip" and all(r.value is None for r in returns):
        return "skip"
    if hook_type == "AROUND" and around_form == "then" and final_only:
        return "then"
    if hook_type == "AROUND" and around_form == "then" and passes_false and returns:
        last = node.body[-1]
        early = [r for r in returns if r is not last]
        passed = [r for r in early if _false_or_gated(r.value, gated)]
        if isinstance(last, ast.Return) and last.value is not None and passed == early:
            return "then"
    a = node.args
    named = {x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)}
    if hook_type == "AROUND" and around_form == "argument" and assigns and set(assigns) <= named:
        return "argument"
    return None


def inline_form(
    package: Path, edit: Edit, hook: object, hooks: Iterable[tuple[str, object]]
) -> str | None:
    """Where ``edit``'s inline call goes in upstream's function (None: a decoration): where
    the function's shape in ``package`` allows one (`inline_shape`), for a BEFORE or AFTER
    hook that changes no argument or result (HookRegistry would pass a returned value on) and
    for an AROUND hook made by `inline.instead`, `inline.done_instead`, `inline.then` or
    `inline.argument`. ``hooks``: every (target, hook) of the plugin, for the methods of the
    same class the same hook amends (``gated``)."""
    from sglang_kvalloc.upstream.inline import INLINE_ARGUMENT, INLINE_FORM, INLINE_PASSES_FALSE

    file, attrs = _target_file(package, edit.target)
    node = _find_def(ast.parse(file.read_text()), attrs)
    if edit.hook_type in ("BEFORE", "AFTER"):
        if getattr(hook, "__annotations__", {}).get("return") not in (None, "None"):
            return None
    around_form = getattr(hook, INLINE_FORM, None)
    owner, _, _ = edit.target.rpartition(".")
    gated = frozenset(
        target.rpartition(".")[2]
        for target, other in hooks
        if other is hook and target.rpartition(".")[0] == owner and target != edit.target
    )
    return inline_shape(
        node,
        edit.hook_type,
        around_form,
        getattr(hook, INLINE_ARGUMENT, None),
        bool(getattr(hook, INLINE_PASSES_FALSE, False)),
        gated,
    )


def _arguments(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """The function's own parameters as a call passes them on (as HookRegistry's wrappers
    pass the caller's arguments)."""
    a = node.args
    out = [x.arg for x in (*a.posonlyargs, *a.args)]
    if a.vararg is not None:
        out.append(f"*{a.vararg.arg}")
    out += [f"{x.arg}={x.arg}" for x in a.kwonlyargs]
    if a.kwarg is not None:
        out.append(f"**{a.kwarg.arg}")
    return out


def _wrapped(indent: str, head: str, items: list[str], tail: str = ")") -> list[str]:
    """``head`` + items + ``tail`` as black writes it at `LINE_LIMIT` columns."""
    one = f"{indent}{head}{', '.join(items)}{tail}"
    if len(one) <= LINE_LIMIT:
        return [one]
    inner = f"{indent}    {', '.join(items)}"
    if len(inner) <= LINE_LIMIT:
        return [f"{indent}{head}", inner, f"{indent}{tail}"]
    return [f"{indent}{head}", *[f"{indent}    {x}," for x in items], f"{indent}{tail}"]


def inline_call_lines(
    node: ast.FunctionDef | ast.AsyncFunctionDef,
    edit: Edit,
    indent: str,
    result: str | None,
    head: str = "",
) -> list[str]:
    """The import and the call of ``edit``'s hook, as upstream writes a local import; the
    call's line starts with ``head`` (``return ``, ``built = ``)."""
    module = edit.hook.partition(":")[0]
    lines = [f"{indent}from {module} import {edit.function}"]
    if len(lines[0]) > LINE_LIMIT:
        lines = [f"{indent}from {module} import (", f"{indent}    {edit.function},", f"{indent})"]
    args = _arguments(node)
    if result is not None:
        args = [result, *args]
    return lines + _wrapped(indent, f"{head}{edit.function}(", args)


def _body_indent(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    return re.match(r"\s*", lines[node.body[0].lineno - 1]).group(0)  # type: ignore[union-attr]


def _inline_inserts(
    lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef, edit: Edit
) -> list[tuple[int, int, list[str]]]:
    """(first line, lines replaced, new lines) of ``edit``'s inline call, 0-based."""
    shape = edit.form
    indent = _body_indent(lines, node)
    if shape in ("start", "instead", "argument", "skip"):
        first = node.body[0]
        is_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
        is_doc = is_doc and isinstance(first.value.value, str)  # type: ignore[union-attr]
        at = (first.end_lineno or first.lineno) if is_doc else first.lineno - 1
        if shape == "start":
            return [(at, 0, inline_call_lines(node, edit, indent, None))]
        if shape == "argument":
            head = f"{', '.join(edit.assigns or ())} = "
            return [(at, 0, inline_call_lines(node, edit, indent, None, head))]
        if shape == "skip":
            call = inline_call_lines(node, edit, indent, None, "if ")
            call[-1] += ":"
            return [(at, 0, [*call, f"{indent}    return"])]
        if BUILT in _arguments(node):
            raise SeriesError(f"{edit.target}: a parameter is named {BUILT!r}")
        call = inline_call_lines(node, edit, indent, None, f"{BUILT} = ")
        returned = [f"{indent}if {BUILT} is not None:", f"{indent}    return {BUILT}"]
        return [(at, 0, [*call, *returned])]
    if shape == "end":
        last = node.body[-1]
        return [(last.end_lineno or last.lineno, 0, inline_call_lines(node, edit, indent, "None"))]
    if shape in ("return", "then"):
        ret = node.body[-1]
        start, end = ret.lineno - 1, ret.end_lineno or ret.lineno
        head = "return " if shape == "then" else ""
        if isinstance(ret.value, ast.Name):  # upstream's own name for its result
            call = inline_call_lines(node, edit, indent, ret.value.id, head)
            return [(start, end - start, call)] if head else [(start, 0, call)]
        if RESULT in _arguments(node):
            raise SeriesError(f"{edit.target}: a parameter is named {RESULT!r}")
        text = "".join(lines[start:end])
        assigned = re.sub(r"^(\s*)return\b", rf"\1{RESULT} =", text, count=1).rstrip("\n")
        new = [*assigned.split("\n"), *inline_call_lines(node, edit, indent, RESULT, head)]
        return [(start, end - start, new if head else [*new, f"{indent}return {RESULT}"])]
    raise SeriesError(f"{edit.target}: no inline call for a {edit.hook_type} hook of this shape")


def edit_file(path: Path, edits: list[tuple[list[str], Edit]]) -> None:
    """Write each edit into its function in ``path``: the inline call, or the decoration (and
    the decorator's import, once)."""
    text = path.read_text()
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    changes: list[tuple[int, int, list[str]]] = []
    decorated = False
    for attrs, edit in edits:
        node = _find_def(tree, attrs)
        if edit.inline:
            changes += _inline_inserts([x.rstrip("\n") + "\n" for x in lines], node, edit)
            continue
        decorated = True
        names = [d.id for d in node.decorator_list if isinstance(d, ast.Name)]
        if any(edit.hook in (ast.get_source_segment(text, d) or "") for d in node.decorator_list):
            raise SeriesError(f"{edit.target} already carries {edit.hook}")
        # As HookRegistry does: wrap the function under @classmethod / @staticmethod, and the
        # decorated function otherwise.
        if {"classmethod", "staticmethod"} & set(names) or not node.decorator_list:
            at = node.lineno - 1
        else:
            at = node.decorator_list[0].lineno - 1
        indent = re.match(r"\s*", lines[node.lineno - 1]).group(0)  # type: ignore[union-attr]
        changes.append((at, 0, [f"{indent}{edit.line}"]))
    if decorated and IMPORT_LINE not in text:
        changes.append((_import_line_index(tree), 0, ["", IMPORT_LINE]))
    # Bottom up, so earlier line numbers stay valid; at one line, the later edit goes first.
    for at, replaced, new in sorted(changes, key=lambda c: c[0], reverse=True):
        lines[at : at + replaced] = [line + "\n" for line in new]
    new_text = "".join(lines)
    ast.parse(new_text)  # an edit that breaks the file is a bug here, not the user's problem
    path.write_text(new_text)


def insert_lines(package: Path, insertion: Insertion) -> None:
    """Write ``insertion`` into its upstream file (SeriesError where its anchor is not there
    exactly once: an upstream that moved on)."""
    path = package / insertion.file
    lines = path.read_text().splitlines(keepends=True)

    def once(wanted: str, start: int = 0, first: bool = False) -> int:
        at = [i for i, line in enumerate(lines) if i >= start and line.rstrip("\n") == wanted]
        if not at or (len(at) > 1 and not first):
            raise SeriesError(f"{insertion.file}: {wanted.strip()!r} occurs {len(at)} times")
        return at[0]

    if insertion.within is None:
        anchor = once(insertion.anchor)
    else:
        anchor = once(insertion.anchor, once(insertion.within) + 1, first=True)
    index = anchor + 1 if insertion.after else anchor
    lines[index:index] = [line + "\n" for line in insertion.lines]
    path.write_text("".join(lines))


def cut_part(text: str, part: Part) -> str:
    """``text`` without the lines of ``part``."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.rstrip("\n") == part.first]
    if len(starts) != 1:
        raise SeriesError(f"{part.file}: {len(starts)} lines {part.first!r} (must be one)")
    start = starts[0]
    stop = len(lines)
    if part.end is not None:
        ends = [i for i in range(start + 1, len(lines)) if lines[i].rstrip("\n") == part.end]
        if not ends:
            raise SeriesError(f"{part.file}: no line {part.end!r} after {part.first!r}")
        stop = ends[0]
    return "".join(lines[:start] + lines[stop:])
