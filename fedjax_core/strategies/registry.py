"""Which strategies exist, by name: the built-ins, and plugins from other installed packages.

Built-in strategies register themselves with :func:`register`. Other packages declare theirs in
the ``fedjax.strategies`` entry-point group (``name = "module:Class"``, the class a
:class:`~fedjax_core.strategies.Strategy` subclass whose ``name`` is the entry point's); they are
loaded once, on the first lookup. A plugin that fails to import, is not a strategy, or takes a
name already taken is refused with a message naming its entry point (logged, and raised when
that name is asked for); the built-ins and the other plugins keep working. Only names and JSON
parameters ever travel: the director builds strategies from its own registry
(:func:`strategy_from_wire`), never from code a notebook sent.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import threading
from collections.abc import Iterator, Mapping

from fedjax_core.strategies.base import Strategy, StrategyError

log = logging.getLogger("fedjax.strategies")

ENTRY_POINT_GROUP = "fedjax.strategies"
_registered: dict[str, type[Strategy]] = {}  # register(): the built-ins (and any registered in-process)
_plugins: dict[str, type[Strategy]] | None = None  # entry points, loaded on the first lookup
_refused: dict[str, str] = {}  # entry-point name -> why it was refused
_lock = threading.RLock()


def _problem(cls: object) -> str:
    """What makes ``cls`` unfit to be registered, or ''."""
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        return f"{cls!r} is not a subclass of fedjax_core.strategies.Strategy"
    if not cls.name or cls.name != cls.name.lower():
        return f"{cls.__qualname__}.name is {cls.name!r}: a strategy's name must be set and lower case"
    return ""


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make ``cls`` known by ``cls.name``. The built-in strategies use it; other packages
    declare an entry point instead (see the module's docstring and docs/strategies.md)."""
    problem = _problem(cls)
    if problem:
        raise StrategyError(f"cannot register {cls!r}: {problem}")
    with _lock:
        taken = _registered.get(cls.name)
        if taken is not None and taken is not cls:
            raise StrategyError(f"cannot register {cls.__module__}.{cls.__qualname__}: the name {cls.name!r} "
                                f"is {taken.__module__}.{taken.__qualname__}'s")
        _registered[cls.name] = cls
    return cls


def _where(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    source = f" of package {dist.name!r}" if dist is not None else ""
    return f"entry point '{ep.name} = {ep.value}'{source} (group {ENTRY_POINT_GROUP!r})"


def _uninstall(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"pip uninstall {dist.name}" if dist is not None else "uninstall the package that declares it"


def _discover() -> tuple[dict[str, type[Strategy]], dict[str, str]]:
    """Load every entry point of the group: ``(plugins by name, refused entry points by name -> why)``."""
    found: dict[str, tuple[type[Strategy], importlib.metadata.EntryPoint]] = {}
    refused: dict[str, str] = {}
    clashed: set[str] = set()
    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name, e.value)):
        key = ep.name.lower()
        try:
            cls = ep.load()
        except Exception as exc:  # a plugin's import error must not take the built-ins down
            refused[key] = (f"strategy plugin {_where(ep)} failed to load: {type(exc).__name__}: {exc}. Fix or "
                            f"reinstall that package, or {_uninstall(ep)}; the other strategies work without it")
            continue
        problem = _problem(cls)
        if not problem and cls.name != key:
            problem = f"it loads a strategy named {cls.name!r}: name the entry point {cls.name!r}"
        builtin = _registered.get(key)
        if not problem and builtin is not None and builtin is not cls:
            problem = (f"{key!r} is the name of {builtin.__module__}.{builtin.__qualname__}, which it cannot "
                       f"replace: give the plugin's strategy (its name and its entry point) another name")
        other = found.get(key)
        if not problem and (key in clashed or other is not None and other[0] is not cls):
            where = _where(other[1]) if other is not None else "another entry point"
            problem = f"{where} names a strategy {key!r} too: uninstall or rename all but one of them"
            found.pop(key, None)
            clashed.add(key)
        if problem:
            refused[key] = f"strategy plugin {_where(ep)} was refused: {problem}"
        elif builtin is None:
            found[key] = (cls, ep)
    return {key: cls for key, (cls, _) in found.items()}, refused


def _load_plugins() -> dict[str, type[Strategy]]:
    global _plugins
    with _lock:
        if _plugins is None:
            _plugins = {}  # a plugin that looks strategies up while it loads sees none yet
            try:
                plugins, refused = _discover()
            except Exception as exc:  # unreadable package metadata: the built-ins still work
                plugins, refused = {}, {"": f"strategy plugins could not be listed: {type(exc).__name__}: {exc}"}
            _refused.clear()
            _refused.update(refused)
            for message in refused.values():
                log.warning("%s", message)
            _plugins = plugins
        return _plugins


def refused_plugins() -> dict[str, str]:
    """Entry points of ``fedjax.strategies`` that were refused, by name: why, and what to do."""
    _load_plugins()
    return dict(_refused)


class _Strategies(Mapping[str, type[Strategy]]):
    """Every known strategy by name: the built-ins in their order, then the plugins."""

    def _all(self) -> dict[str, type[Strategy]]:
        plugins = _load_plugins()
        return {**_registered, **{k: v for k, v in plugins.items() if k not in _registered}}

    def __getitem__(self, name: str) -> type[Strategy]:
        return self._all()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


STRATEGIES: Mapping[str, type[Strategy]] = _Strategies()


def lookup(name: str) -> type[Strategy]:
    """The strategy class called ``name`` (any case); the error lists those there are."""
    key = name.lower()
    plugins = _load_plugins()
    cls = _registered.get(key) or plugins.get(key)
    if cls is not None:
        return cls
    if key in _refused:
        raise StrategyError(f"aggregation {name!r}: {_refused[key]}")
    known = f"built-in strategies: {', '.join(_registered)}"
    if plugins:
        known += f"; plugins: {', '.join(plugins)}"
    if _refused:
        known += f"; refused plugins (see the log): {', '.join(k for k in _refused if k)}"
    raise StrategyError(f"unknown aggregation {name!r}; {known}")


def as_strategy(value: Strategy | str) -> Strategy:
    """A strategy object from an object or a name (``"fedavg"``, ``"fedadam"``... with default parameters)."""
    if isinstance(value, Strategy):
        return value
    if isinstance(value, str):
        return strategy_from_wire(value, "{}")
    raise StrategyError(f"aggregation must be a strategy such as FedAdam(eta=0.1) or a name such as 'fedavg', "
                        f"got {type(value).__name__}")


def strategy_from_wire(name: str, params_json: str) -> Strategy:
    """Rebuild a strategy from its name and JSON parameters; errors name the strategy and the parameter."""
    cls = lookup(name)
    try:
        params = json.loads(params_json or "{}")
    except (ValueError, RecursionError):
        raise StrategyError(f"aggregation parameters of {name!r} are not valid JSON (or nest too deeply): "
                            f"{params_json[:200]!r}") from None
    if not isinstance(params, dict):
        raise StrategyError(f"aggregation parameters of {name!r} must be a JSON object, got {params_json[:200]!r}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise StrategyError(f"{cls.__name__} has no parameter {unknown[0]!r}; its parameters: {', '.join(known) or 'none'}")
    return cls(**params)
