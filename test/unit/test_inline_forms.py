"""An `inline.argument` hook does the same as the plugin's wrapper and as the series' inline call.

The plugin wraps upstream's function (HookRegistry's AROUND wrapper over `inline.argument`); the
series writes the same function's call as the first statement of upstream's function
(`series_edits`). Both must hand upstream's code the same arguments, however the caller passes
them: by position, by keyword, or not at all (upstream's default)."""

from __future__ import annotations

import ast
import importlib
import shutil
from pathlib import Path

import pytest
from sglang.srt.plugins.hook_registry import HookType, _wrap_fn

from sglang_kvalloc.upstream import inline
from sglang_kvalloc_harness import series_edits

HOOKS = """
def chosen_rows(self, table, rows, seq, *, scale=1):
    return [x * 10 for x in table], rows + seq


def chosen_scale(self, table, rows, seq, *, scale=1):
    return scale + 1
"""

UPSTREAM = '''
class Backend:
    def run(self, table, rows, seq, *, scale=1):
        """Upstream's function."""
        return (table, rows, seq, scale)
'''

CALLS = [
    (([1, 2], 3, 4), {}),
    (([1, 2], 3), {"seq": 4, "scale": 5}),
    ((), {"table": [7], "rows": 1, "seq": 2}),
]


def _module(folder: Path, name: str, text: str) -> object:
    (folder / f"{name}.py").write_text(text)
    return importlib.import_module(name)


@pytest.mark.parametrize(
    ("names", "choose"),
    [(("table", "rows"), "chosen_rows"), (("scale",), "chosen_scale")],
    ids=["two-positional", "keyword-only"],
)
def test_the_wrapper_and_the_inline_call_pass_upstream_the_same_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, names: tuple[str, ...], choose: str
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    hooks = _module(tmp_path, f"arg_hooks_{choose}", HOOKS)
    upstream = _module(tmp_path, f"upstream_{choose}", UPSTREAM)
    hook = inline.argument(names if len(names) > 1 else names[0], getattr(hooks, choose))
    assert getattr(hook, inline.INLINE_ARGUMENT) == names
    wrapped = _wrap_fn(upstream.Backend.run, hook, HookType.AROUND)

    source = tmp_path / f"upstream_{choose}.py"
    node = series_edits._find_def(ast.parse(source.read_text()), ["Backend", "run"])
    assert series_edits.inline_shape(node, "AROUND", inline.ARGUMENT, names) == "argument"
    edited = tmp_path / f"edited_{choose}.py"
    shutil.copyfile(source, edited)
    edit = series_edits.Edit(
        "x.Backend.run", "AROUND", f"{hooks.__name__}:{choose}", form="argument", assigns=names
    )
    series_edits.edit_file(edited, [(["Backend", "run"], edit)])
    text = edited.read_text()
    assert f"{', '.join(names)} = {choose}(self, table, rows, seq, scale=scale)" in text
    inlined = importlib.import_module(f"edited_{choose}")

    for args, kwargs in CALLS:
        plain = upstream.Backend().run(*args, **kwargs)
        by_plugin = wrapped(upstream.Backend(), *args, **kwargs)
        by_series = inlined.Backend().run(*args, **kwargs)
        assert by_plugin == by_series != plain, (args, kwargs)


def test_an_argument_the_function_does_not_have_gets_no_inline_call() -> None:
    node = ast.parse(UPSTREAM).body[0].body[0]  # type: ignore[attr-defined]
    assert series_edits.inline_shape(node, "AROUND", inline.ARGUMENT, ("missing",)) is None
    assert series_edits.inline_shape(node, "AROUND", inline.ARGUMENT, ("rows", "missing")) is None


GATES = '''
def gate(ok, self, batch):
    return ok and batch < 10


class Runner:
    def can_run(self, batch):
        """Upstream's check, with early exits."""
        if batch < 0:
            return False
        if batch == 99:
            return False
        supported = batch % 2 == 0
        return supported


class Other:
    def can_run(self, batch):
        if batch < 0:
            return self.fallback(batch)
        return True
'''


def test_a_gate_called_at_the_final_return_alone_is_exact_where_the_others_return_false(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `then` hook that passes False through (`passes_false`) may be called at the final
    return of a function whose other returns all return False: the plugin's wrapper and the
    series' inline call give the same for every input. Not where another return could give
    True, nor for a hook that does not pass False through."""
    monkeypatch.syspath_prepend(str(tmp_path))
    module = _module(tmp_path, "gate_upstream", GATES)
    hook = inline.then(module.gate, passes_false=True)
    assert getattr(hook, inline.INLINE_PASSES_FALSE) is True
    tree = ast.parse(GATES)
    runner = series_edits._find_def(tree, ["Runner", "can_run"])
    other = series_edits._find_def(tree, ["Other", "can_run"])
    assert series_edits.inline_shape(runner, "AROUND", inline.THEN, None, True) == "then"
    assert series_edits.inline_shape(runner, "AROUND", inline.THEN, None, False) is None
    assert series_edits.inline_shape(other, "AROUND", inline.THEN, None, True) is None
    # ... unless what that return gives is a method the same gate amends (upstream's decode
    # runner and its ragged-verify check): the gate acted there already.
    gated = frozenset({"fallback"})
    assert series_edits.inline_shape(other, "AROUND", inline.THEN, None, True, gated) == "then"
    assert series_edits.inline_shape(other, "AROUND", inline.THEN, None, False, gated) is None

    edited = tmp_path / "gate_edited.py"
    shutil.copyfile(tmp_path / "gate_upstream.py", edited)
    edit = series_edits.Edit("x.Runner.can_run", "AROUND", "gate_upstream:gate", form="then")
    series_edits.edit_file(edited, [(["Runner", "can_run"], edit)])
    assert "return gate(supported, self, batch)" in edited.read_text()
    inlined = importlib.import_module("gate_edited")
    wrapped = _wrap_fn(module.Runner.can_run, hook, HookType.AROUND)
    for batch in (-1, 0, 1, 4, 12, 99):
        assert wrapped(module.Runner(), batch) == inlined.Runner().can_run(batch), batch
    assert [inlined.Runner().can_run(b) for b in (4, 12)] == [True, False]  # the gate acts


SKIPS = '''
def reserved_here(model, config, log=None):
    """Segmented mode's own reservation: done where the config asks for it."""
    if config == "lazy":
        model.append("lazy")
        return True
    return False


def reserve(model, config, log=None):
    """Upstream's function: it returns nothing."""
    model.append(f"upstream {config}")


def reserve_value(model, config):
    return len(model)
'''


def test_a_hook_done_instead_returns_first_in_a_function_that_returns_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`inline.done_instead`: the plugin's wrapper and the series' ``if f(...): return`` first
    in upstream's function do the same; a function that returns a value gets no such call."""
    monkeypatch.syspath_prepend(str(tmp_path))
    module = _module(tmp_path, "skip_upstream", SKIPS)
    hook = inline.done_instead(module.reserved_here)
    assert getattr(hook, inline.INLINE_FORM) == inline.SKIP
    tree = ast.parse(SKIPS)
    reserve = series_edits._find_def(tree, ["reserve"])
    valued = series_edits._find_def(tree, ["reserve_value"])
    assert series_edits.inline_shape(reserve, "AROUND", inline.SKIP) == "skip"
    assert series_edits.inline_shape(valued, "AROUND", inline.SKIP) is None

    edited = tmp_path / "skip_edited.py"
    shutil.copyfile(tmp_path / "skip_upstream.py", edited)
    edit = series_edits.Edit("x.reserve", "AROUND", "skip_upstream:reserved_here", form="skip")
    series_edits.edit_file(edited, [(["reserve"], edit)])
    assert "    if reserved_here(model, config, log):\n        return\n" in edited.read_text()
    inlined = importlib.import_module("skip_edited")
    wrapped = _wrap_fn(module.reserve, hook, HookType.AROUND)
    for config in ("lazy", "eager"):
        ours, theirs = [], []
        assert wrapped(ours, config) is None and inlined.reserve(theirs, config) is None
        assert ours == theirs == (["lazy"] if config == "lazy" else [f"upstream {config}"])
