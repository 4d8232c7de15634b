"""Registries: the one list of names of each kind of component a config can select (relevance functions, losses,
dataset readers).

    LOSSES = Registry("loss", "loss.name")
    LOSSES.register("listnet", "relret.losses:ListNetLoss", config=ListNetConfig)   # lazy: imported on first use

    @LOSSES.register("mine", config=MyLossConfig)                                   # from any module, e.g. a plugin
    class MyLoss(GlobalBatchLoss): ...

A name maps to its component (an object, or a "module:attribute" string imported the first time it is asked for) and,
optionally, to the dataclass of its own config section. Lazy entries let a torch-free module (relret.config, which
the launcher imports to validate configs) hold the names of components whose code needs torch. This module imports
nothing beyond the standard library.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any


class UnknownName(ValueError):
    """A name that is not registered; the message lists the registered ones."""


@dataclasses.dataclass
class _Entry:
    target: Any
    """The component, or "module:attribute" until first use."""
    config: type | None


class Registry:
    """Named components of one kind."""

    def __init__(self, kind: str, key: str) -> None:
        """`kind` names the kind in messages ("loss"); `key` is the config key that selects one ("loss.name")."""
        self.kind = kind
        self.key = key
        self._entries: dict[str, _Entry] = {}

    def register(self, name: str, target: Any = None, *, config: type | None = None) -> Any:
        """Register `target` (an object or "module:attribute") under `name`; without `target`, a decorator.

        Registering a name again is refused unless it is the same target (a module imported twice)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")

        def add(obj: Any) -> Any:
            old = self._entries.get(name)
            if old is not None and old.target is not obj and _qualname(old.target) != _qualname(obj):
                raise ValueError(f"{self.kind} {name!r} is already registered ({_qualname(old.target)})")
            self._entries[name] = _Entry(obj, config)
            return obj

        return add if target is None else add(target)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def check(self, name: object, key: str | None = None) -> str:
        """`name` if registered; else UnknownName naming the config key and the registered names."""
        if isinstance(name, str) and name in self._entries:
            return name
        choices = ", ".join(repr(n) for n in self._entries)
        raise UnknownName(f"{key or self.key}: expected one of {choices}, got {name!r}")

    def get(self, name: str) -> Any:
        """The component registered under `name` (imported on first use when registered lazily)."""
        entry = self._entries[self.check(name)]
        if isinstance(entry.target, str):
            module, _, attribute = entry.target.partition(":")
            entry.target = getattr(importlib.import_module(module), attribute)
        return entry.target

    def config_class(self, name: str) -> type | None:
        """The dataclass of `name`'s own config section, or None when it has none."""
        return self._entries[self.check(name)].config


def _qualname(obj: Any) -> str:
    if isinstance(obj, str):
        return obj
    module = getattr(obj, "__module__", "?")
    return f"{module}:{getattr(obj, '__qualname__', repr(obj))}"
