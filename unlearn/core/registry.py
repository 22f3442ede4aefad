"""One registry for every kind of component: objectives, optimizers, benchmarks and attacks.

A component registers under a name (and optional aliases) with a decorator; configs and flags name it. The
registry refuses a second registration of a name (a silent overwrite would make a config mean different
things depending on import order), and an unknown name is one line that lists the choices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from unlearn.core.errors import UserError, shown

T = TypeVar("T")


class UnknownName(UserError, ValueError):
    """A name no component is registered under. A UserError for the CLI (exit 2), and a ValueError for the
    builders that report every bad option as one (build_optimizer, build_objective)."""


_BY_KIND: dict[str, Registry] = {}


def registry_of(kind: str) -> Registry | None:
    """The registry of one kind of component ("method", "optimizer", ...), once its module is imported."""
    return _BY_KIND.get(kind)


class Registry(Mapping[str, T], Generic[T]):
    """name -> component. Iterating gives the canonical names; lookups also accept aliases."""

    def __init__(self, kind: str, check: Callable[[str, T], None] | None = None) -> None:
        self.kind = kind
        self._check = check  # what every member must declare (e.g. an optimizer's grade); raises TypeError
        self._members: dict[str, T] = {}
        self._aliases: dict[str, str] = {}
        _BY_KIND[kind] = self

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        def add(component: T) -> T:
            if self._check is not None:
                self._check(name, component)
            for key in (name, *aliases):
                if key in self._members or key in self._aliases:
                    raise RuntimeError(f"{self.kind} '{key}' registered twice")
            self._members[name] = component
            self._aliases.update(dict.fromkeys(aliases, name))
            return component

        return add

    def canonical(self, name: str) -> str:
        """The registered name `name` stands for (itself, or the name an alias points to)."""
        if name in self._members:
            return name
        if isinstance(name, str) and name in self._aliases:
            return self._aliases[name]
        raise UnknownName(f"unknown {self.kind} {shown(name)}; choose from: {', '.join(self.choices())}")

    def lookup(self, name: str) -> T:
        return self._members[self.canonical(name)]

    def choices(self) -> list[str]:
        """Every name a config may use, aliases included."""
        return sorted([*self._members, *self._aliases])

    def aliases(self, name: str) -> list[str]:
        return sorted(a for a, target in self._aliases.items() if target == name)

    def __getitem__(self, name: str) -> T:
        try:
            return self.lookup(name)
        except UnknownName:
            raise KeyError(name) from None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._members or name in self._aliases)

    def __iter__(self) -> Iterator[str]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)
