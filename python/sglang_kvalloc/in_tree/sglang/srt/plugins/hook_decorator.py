"""Apply a hook where a function is defined: ``@kvalloc_hook("AROUND", "module:name")``.

For changes that wrap upstream's call (a context around a capture, buffers put in place
while a backend builds its graph state) and are not yet an inline call of their own. The
wrapper is upstream's own (`hook_registry._wrap_fn`), so BEFORE, AFTER and AROUND behave
exactly as they do through `HookRegistry`; the hook's module is imported at the first
call, which keeps the import order (and its import cycles) as it is.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class _LazyHook:
    """The hook function named ``module:name``, imported when first called."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._hook: Callable[..., Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._hook is None:
            module, _, name = self.path.partition(":")
            self._hook = getattr(importlib.import_module(module), name)
        return self._hook(*args, **kwargs)


def kvalloc_hook(hook_type: str, path: str) -> Callable[[F], F]:
    """Decorate a function with the hook at ``path`` (``module:name``) of ``hook_type``
    (BEFORE, AFTER or AROUND, with `HookRegistry`'s calling conventions)."""
    from sglang.srt.plugins.hook_registry import HookType, _wrap_fn

    kind = HookType[hook_type]
    if kind == HookType.REPLACE:
        raise ValueError(
            "kvalloc_hook: REPLACE is not a decoration; edit the function instead"
        )

    def decorate(fn: F) -> F:
        return _wrap_fn(fn, _LazyHook(path), kind)  # type: ignore[return-value]

    return decorate
