"""The three plugin registries: pre-training methods, evaluation protocols, evaluation sets.

Each is a `Registry`: a class registers itself by name with a decorator (``@register_method``,
``@register_protocol``, ``@register_eval_set``). Built-ins are found by importing every module of
their package (``mugbench.methods``, ``mugbench.protocols``, ``mugbench.evalsets``), so adding one is
one new file; out-of-tree plugins declare a module in the matching entry-point group.
"""
from __future__ import annotations

import importlib
import pkgutil
import warnings
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .evalset import EvalSetSource
    from .method import Method
    from .protocol import Protocol


class UnknownNameError(KeyError):
    """A name that nobody registered; the message lists the registered ones."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


class UnknownMethodError(UnknownNameError):
    """A method name that nobody registered."""


class Registry:
    """Classes of one kind by name: the built-ins of ``package`` plus entry-point plugins of ``group``.

    ``decorator`` is the name of the registering decorator and ``listing`` the command that lists the
    registered names, both named in the error (an ``error``, a `UnknownNameError` subclass) for an unknown name.
    """

    def __init__(self, kind: str, package: str, group: str, decorator: str, listing: str,
                 error: type = UnknownNameError):
        self.kind, self.package, self.group, self.error = kind, package, group, error
        self.decorator, self.listing = decorator, listing
        self._classes: dict[str, type] = {}
        self._discovered = False

    def register(self, name: str):
        """Class decorator that registers its class under ``name`` and sets ``cls.name``."""

        def wrap(cls):
            if name in self._classes and self._classes[name] is not cls:
                raise ValueError(f"{self.kind} name {name!r} is already registered by {self._classes[name].__module__}")
            cls.name = name
            self._classes[name] = cls
            return cls

        return wrap

    def unregister(self, name: str) -> None:
        """Forget ``name`` (tests that register a throw-away class clean up with this)."""
        self._classes.pop(name, None)

    def _discover(self) -> None:
        """Import the built-in modules and the entry-point plugins once."""
        if self._discovered:
            return
        self._discovered = True
        pkg = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{pkg.__name__}.{info.name}")
        for ep in entry_points(group=self.group):
            try:
                ep.load()
            except Exception as exc:  # a broken plugin must not take the built-ins down
                warnings.warn(f"mugbench: could not load {self.kind} plugin {ep.name!r} ({ep.value}): {exc}")

    def all(self) -> dict[str, type]:
        """Every registered class by name, in name order."""
        self._discover()
        return dict(sorted(self._classes.items()))

    def get(self, name: str) -> Any:
        """The class registered as ``name``; an ``error`` listing the known names otherwise."""
        known = self.all()
        if name not in known:
            raise self.error(
                f"Unknown {self.kind} {name!r}. Registered {self.kind}s: {', '.join(known) or '(none)'}. "
                f"A {self.kind} is a module in {self.package.replace('.', '/')}/ decorated with "
                f"@{self.decorator}, or a plugin declared in the {self.group!r} entry-point "
                f"group; `{self.listing}` lists them.")
        return known[name]


METHODS = Registry("method", "mugbench.methods", "mugbench.methods", "register_method", "mugbench methods",
                   UnknownMethodError)
PROTOCOLS = Registry("protocol", "mugbench.protocols", "mugbench.protocols", "register_protocol", "mugbench protocols")
# `mugbench protocols` lists the evaluation sets too, beside the protocols that read them.
EVAL_SETS = Registry("evaluation set", "mugbench.evalsets", "mugbench.eval_sets", "register_eval_set",
                     "mugbench protocols")
ENTRY_POINT_GROUP = METHODS.group


def register_method(name: str):
    """Class decorator that registers a `Method` subclass under ``name``."""
    return METHODS.register(name)


def register_protocol(name: str):
    """Class decorator that registers a `Protocol` subclass under ``name``."""
    return PROTOCOLS.register(name)


def register_eval_set(name: str):
    """Class decorator that registers an `EvalSetSource` subclass under ``name``."""
    return EVAL_SETS.register(name)


def registered_methods() -> dict[str, type["Method"]]:
    """All registered methods by name, in name order."""
    return METHODS.all()


def get_method(name: str) -> type["Method"]:
    """The method class registered as ``name``; `UnknownMethodError` lists the known names."""
    return METHODS.get(name)


def registered_protocols() -> dict[str, type["Protocol"]]:
    """All registered protocols by name, in name order (`Protocol.order` gives the display order)."""
    return PROTOCOLS.all()


def get_protocol(name: str) -> type["Protocol"]:
    """The protocol class registered as ``name``; `UnknownNameError` lists the known names."""
    return PROTOCOLS.get(name)


def registered_eval_sets() -> dict[str, type["EvalSetSource"]]:
    """All registered evaluation sets by name, in name order."""
    return EVAL_SETS.all()


def get_eval_set(name: str) -> type["EvalSetSource"]:
    """The evaluation set registered as ``name``; `UnknownNameError` lists the known names."""
    return EVAL_SETS.get(name)


def parse_method_list(spec: str) -> list[str]:
    """Split ``"mae,clip"`` into names and check every one before any work starts."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise UnknownMethodError("No method given: pass --methods with a comma-separated list of names.")
    for n in names:
        get_method(n)
    return names
