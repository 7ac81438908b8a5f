"""A small name -> implementation registry; unknown names list the valid ones."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from sparseheal.errors import ConfigError

__all__ = ["Registry", "PRUNERS", "HEALERS", "EVALUATORS"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps method names (and aliases) to implementations.

    Args:
        kind: What the registry holds, used in error messages ("pruning method").
        flag: The command-line flag that selects an entry ("--method").
    """

    def __init__(self, kind: str, flag: str) -> None:
        self.kind = kind
        self.flag = flag
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name`` and any ``aliases`` (and sets ``obj.name``)."""

        def wrap(obj: T) -> T:
            if name in self._entries or name in self._aliases:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            for alias in aliases:
                self._aliases[alias] = name
            obj.name = name  # type: ignore[attr-defined]
            return obj

        return wrap

    def canonical(self, name: str) -> str:
        """Returns the canonical name for ``name`` (resolving aliases) or raises ConfigError."""
        key = self._aliases.get(name, name)
        if key not in self._entries:
            valid = ", ".join(self.names())
            raise ConfigError(self.flag, f"unknown {self.kind} {name!r}; choose from: {valid}")
        return key

    def get(self, name: str) -> T:
        """Returns the implementation registered under ``name`` (or one of its aliases)."""
        return self._entries[self.canonical(name)]

    def names(self) -> list[str]:
        """All accepted names, canonical names first."""
        return sorted(self._entries) + sorted(self._aliases)

    def describe(self) -> str:
        """The names for help text: "a, b (alias c) or d"."""
        aliases = {alias: canonical for alias, canonical in self._aliases.items()}
        shown = [name + "".join(f" (alias {a})" for a, n in sorted(aliases.items()) if n == name)
                 for name in sorted(self._entries)]
        return ", ".join(shown[:-1]) + (" or " if len(shown) > 1 else "") + shown[-1]

    def items(self) -> list[tuple[str, T]]:
        """(canonical name, implementation) pairs, in name order."""
        return sorted(self._entries.items())


PRUNERS: Registry = Registry("pruning method", "--method")
HEALERS: Registry = Registry("healing method", "--method")
EVALUATORS: Registry = Registry("evaluation", "evaluate")
