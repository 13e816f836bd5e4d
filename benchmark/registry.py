"""The method registry: built-in methods under `mugbench.methods`, plugins via entry points.

A method registers itself with ``@register_method("name")``. Built-in methods are found by
importing every module of the ``mugbench.methods`` package, so adding a method is one new
file; out-of-tree plugins declare a module in the ``mugbench.methods`` entry-point group.
"""
from __future__ import annotations

import importlib
import pkgutil
import warnings
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .method import Method

ENTRY_POINT_GROUP = "mugbench.methods"
_REGISTRY: dict[str, type["Method"]] = {}
_discovered = False


class UnknownMethodError(KeyError):
    """A method name that nobody registered."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


def register_method(name: str):
    """Class decorator that registers a `Method` subclass under ``name``."""

    def wrap(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method name {name!r} is already registered by {_REGISTRY[name].__module__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _discover() -> None:
    """Import built-in method modules and entry-point plugins once."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    import mugbench.methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # a broken plugin must not take the built-ins down
            warnings.warn(f"mugbench: could not load method plugin {ep.name!r} ({ep.value}): {exc}")


def registered_methods() -> dict[str, type["Method"]]:
    """All registered methods by name, in name order."""
    _discover()
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> type["Method"]:
    """The method class registered as ``name``; `UnknownMethodError` lists the known names."""
    methods = registered_methods()
    if name not in methods:
        raise UnknownMethodError(
            f"Unknown method {name!r}. Registered methods: {', '.join(methods) or '(none)'}. "
            f"A method is a module in mugbench/methods/ decorated with @register_method, or a plugin "
            f"declared in the {ENTRY_POINT_GROUP!r} entry-point group; `mugbench methods` lists them."
        )
    return methods[name]


def parse_method_list(spec: str) -> list[str]:
    """Split ``"mae,clip"`` into names and check every one before any work starts."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise UnknownMethodError("No method given: pass --methods with a comma-separated list of names.")
    for n in names:
        get_method(n)
    return names
