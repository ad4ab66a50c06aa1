"""The plugin's AROUND hooks built from the functions upstream's code calls inline in the
upstream PR series (harness `series_edits.py`): *instead*, *done instead*, *then* and
*argument*. Not part of the series: there, upstream's function calls the same function
itself.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


# The two shapes of AROUND hook that have an inline form: the plugin wraps the function, the
# series calls the same function in upstream's (harness `series_edits.py`). `INLINE_FORM` on
# the wrapper names the shape.
INLINE_FORM = "kvalloc_inline_form"
INSTEAD, THEN, SKIP = "instead", "then", "skip"


def instead(build: Callable[..., Any]) -> Callable[..., Any]:
    """An AROUND hook from ``build(self, ...)``: what segmented mode makes in place of what
    upstream's function makes, or None where upstream's own runs. Inline (the series): the
    function's first statements call ``build`` and return what it built, if anything."""

    @functools.wraps(build)
    def around(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        built = build(*args, **kwargs)
        return original(*args, **kwargs) if built is None else built

    setattr(around, INLINE_FORM, INSTEAD)
    return around


def done_instead(do: Callable[..., bool]) -> Callable[..., Any]:
    """An AROUND hook, for a function that returns nothing, from ``do(self, ...)``: True where
    segmented mode did the function's work its own way, False where upstream's runs. Inline
    (the series): the function's first statements return if ``do`` did it."""

    @functools.wraps(do)
    def around(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if do(*args, **kwargs):
            return None
        return original(*args, **kwargs)

    setattr(around, INLINE_FORM, SKIP)
    return around


# On a `then` hook whose ``amend`` returns False for False: a function whose other returns
# all return False can call it at its final ``return`` alone.
INLINE_PASSES_FALSE = "kvalloc_inline_passes_false"


def then(amend: Callable[..., Any], *, passes_false: bool = False) -> Callable[..., Any]:
    """An AROUND hook from ``amend(result, self, ...)``: upstream's result, or one in its place
    (recorded, checked or adjusted). Inline (the series): the function's final ``return``
    returns ``amend`` of the value it returned. ``passes_false``: ``amend`` gives False back
    for False (a gate), so early ``return False`` statements need no call."""

    @functools.wraps(amend)
    def around(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return amend(original(*args, **kwargs), *args, **kwargs)

    setattr(around, INLINE_FORM, THEN)
    setattr(around, INLINE_PASSES_FALSE, passes_false)
    return around


ARGUMENT = "argument"
# On an `argument` hook: the names of the parameters it chooses (a tuple).
INLINE_ARGUMENT = "kvalloc_inline_argument"


@functools.cache
def _positions(function: Callable[..., Any], names: tuple[str, ...]) -> tuple[int | None, ...]:
    """Where each of ``names`` sits among ``function``'s positional parameters (None: keyword
    only), read once per function: the wrapper runs on hot paths (attention, each layer)."""
    parameters = list(inspect.signature(function).parameters.values())
    positional = [
        p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return tuple(positional.index(n) if n in positional else None for n in names)


def argument(names: str | tuple[str, ...], choose: Callable[..., Any]) -> Callable[..., Any]:
    """An AROUND hook from ``choose(self, ...)``: the value of upstream's parameter ``names``
    (or a tuple of values, one per name) in segmented mode, the caller's values otherwise.
    Inline (the series): the function's first statement assigns the parameters what
    ``choose`` returns."""
    chosen_names = (names,) if isinstance(names, str) else tuple(names)

    @functools.wraps(choose)
    def around(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        chosen = choose(*args, **kwargs)
        values = (chosen,) if len(chosen_names) == 1 else tuple(chosen)
        # Where the caller passed it: by position, else by keyword (or left to its default).
        passed = list(args)
        positions = _positions(original, chosen_names)
        for name, at, value in zip(chosen_names, positions, values, strict=True):
            if at is not None and at < len(passed):
                passed[at] = value
            else:
                kwargs[name] = value
        return original(*passed, **kwargs)

    setattr(around, INLINE_FORM, ARGUMENT)
    setattr(around, INLINE_ARGUMENT, chosen_names)
    return around
