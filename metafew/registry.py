"""One small registry idiom for everything metafew creates by name: backbones, learners, datasets.

Each kind has one :class:`Registry`. A module adds its entry with a decorator next to
the definition, and everything else (the CLI's choices, ``metafew.list_learners()``,
the tests) reads the registry, so adding a learner is one file::

    from metafew.learners import LEARNERS

    @LEARNERS.register("my-learner")
    class MyLearner(Learner): ...

Third-party packages add entries without touching metafew, through an entry point in
their ``pyproject.toml`` (loaded the first time the registry is read)::

    [project.entry-points."metafew.learners"]
    my-learner = "my_package.learner:MyLearner"

Names are case-insensitive; registering a name twice is an error, and an unknown
name gets a "did you mean ...?" hint.

>>> from metafew.registry import Registry
>>> shapes = Registry("shape")
>>> @shapes.register("square")
... def square(side: float) -> float:
...     return side * side
>>> shapes.create("square", 3.0)
9.0
>>> shapes.names()
['square']
>>> shapes.get("sqare")
Traceback (most recent call last):
...
metafew.errors.ConfigError: unknown shape 'sqare'; did you mean 'square'? (available: square)
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


def did_you_mean(name: str, choices: list[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices``, or ``""`` when none is close."""
    close = difflib.get_close_matches(name.lower(), choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_options(factory: Callable[..., Any], options: dict[str, Any], what: str, *args: Any) -> None:
    """Refuse options ``factory`` does not take, or of a type its signature rules out, in one line.

    Checks what the annotations say plainly (``int``, ``float``, ``bool``, ``str``,
    ``Literal[...]``, unions with ``None``); a value of another annotation is let through.

    >>> from typing import Literal
    >>> def make(x: int, rate: float = 0.1, mode: Literal["a", "b"] = "a") -> None: ...
    >>> check_options(make, {"rate": "abc"}, "thing", 1)
    Traceback (most recent call last):
    ...
    metafew.errors.ConfigError: thing: option rate must be a number, got 'abc'
    >>> check_options(make, {"mode": "c"}, "thing", 1)
    Traceback (most recent call last):
    ...
    metafew.errors.ConfigError: thing: option mode must be one of 'a', 'b', got 'c'
    """
    import inspect
    import typing

    target = factory.__init__ if inspect.isclass(factory) else factory  # type: ignore[misc]
    params = inspect.signature(factory).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        names = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        for key in options:
            if key not in params:
                raise ConfigError(
                    f"{what}: unknown option {key!r}{did_you_mean(key, names)} (options: {', '.join(names[len(args) :])})"
                )
    try:
        inspect.signature(factory).bind(*args, **options)
    except TypeError as e:
        raise ConfigError(f"{what}: {e}") from e
    try:
        hints = typing.get_type_hints(target)
    except Exception:
        return
    for key, value in options.items():
        hint = hints.get(key)
        if hint is None:
            continue
        problem = _type_problem(value, hint) or _range_problem(key, value)
        if problem:
            raise ConfigError(f"{what}: option {key} must be {problem}, got {value!r}")


#: Option names whose values are counts (>= 1) or rates (finite, > 0), whatever the learner or backbone.
_COUNTS = ("steps", "batch_size", "n_way", "shots", "hidden", "width", "channels")
_RATES = ("lr", "scale", "temperature")


def _range_problem(key: str, value: Any) -> str | None:
    """A count that is not >= 1, or a rate that is not finite and > 0 (by the option's name)."""
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if key.endswith("inner_steps") and isinstance(value, int) and value < 0:  # 0: no inner adaptation
        return "an integer >= 0"
    if key.endswith("inner_steps"):
        return None
    if any(key == n or key.endswith("_" + n) for n in _COUNTS) and isinstance(value, int) and value < 1:
        return "an integer >= 1"
    if any(key == n or key.endswith("_" + n) for n in _RATES) and not (math.isfinite(value) and value > 0):
        return "a finite number > 0"
    return None


def _type_problem(value: Any, hint: Any) -> str | None:
    """What ``value`` should have been under the simple annotation ``hint`` (None: it fits or cannot tell)."""
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        problems = [_type_problem(value, a) for a in options]
        return None if any(p is None for p in problems) else " or ".join(p for p in problems if p)
    if origin is typing.Literal:
        return None if value in args else "one of " + ", ".join(repr(a) for a in args)
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    return None


def import_submodules(package: str, path: list[str] | Any) -> None:
    """Import every module of ``package`` (its ``__path__``), so each registers its entries.

    This is what makes a new learner, backbone or dataset one file: drop the module in
    its folder and its decorator runs when the package is imported.
    """
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(path):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")


class Registry(Generic[T]):
    """Named factories of one kind (``"learner"``, ``"backbone"``, ``"dataset"``).

    Args:
        kind: what an entry is, used in messages ("unknown learner 'x'").
        group: the entry-point group third-party packages register under
            (e.g. ``"metafew.learners"``); None for no plug-ins.
    """

    def __init__(self, kind: str, group: str | None = None) -> None:
        self.kind = kind
        self.group = group
        self._entries: dict[str, T] = {}
        self._plugins_loaded = group is None

    def register(self, name: str, entry: T | None = None) -> Callable[[T], T]:
        """Add ``entry`` under ``name`` (as a decorator when ``entry`` is omitted); duplicates are refused."""

        def add(obj: T) -> T:
            key = name.lower()
            if key in self._entries and self._entries[key] is not obj:
                raise ConfigError(f"{self.kind} {name!r} is registered twice ({self._entries[key]!r} and {obj!r})")
            self._entries[key] = obj
            return obj

        if entry is not None:
            add(entry)
        return add

    def get(self, name: str) -> T:
        """The entry registered under ``name``; a one-line ConfigError with a suggestion otherwise."""
        self._load_plugins()
        key = str(name).lower()
        if key not in self._entries:
            choices = self.names()
            raise ConfigError(
                f"unknown {self.kind} {name!r}{did_you_mean(key, choices)} (available: {', '.join(choices)})"
            )
        return self._entries[key]

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the entry registered under ``name`` with the given arguments."""
        factory = self.get(name)
        if not callable(factory):
            raise ConfigError(f"{self.kind} {name!r} cannot be created: its entry is not callable")
        return factory(*args, **kwargs)

    def names(self) -> list[str]:
        """Every registered name, sorted (plug-ins included)."""
        self._load_plugins()
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """``(name, entry)`` pairs, sorted by name."""
        return [(n, self._entries[n]) for n in self.names()]

    def __contains__(self, name: object) -> bool:
        self._load_plugins()
        return isinstance(name, str) and name.lower() in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"

    def _load_plugins(self) -> None:
        """Register the entry points of ``group`` once; a broken plug-in is a one-line error naming it."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in entry_points(group=self.group or ""):
            try:
                obj = ep.load()
            except Exception as e:
                raise ConfigError(f"{self.kind} plug-in {ep.name!r} ({ep.value}) failed to load: {e}") from e
            self.register(ep.name, obj)
