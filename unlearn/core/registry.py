"""One registry for every kind of component: methods, optimizers, benchmarks and attacks.

A component registers under a name (and optional aliases) with the one decorator, `@REGISTRY.register("name")`;
configs and flags name it. The registry refuses a second registration of a name (a silent overwrite would make a
config mean different things depending on import order), and an unknown name is one line that lists the choices.

Members are found, not listed: the first time a registry is read it imports every module of its `members`
package (the built-ins) and loads the Python entry points of its group (`unlearn.methods`, `unlearn.optimizers`,
`unlearn.benchmarks`, `unlearn.attacks`): installed distributions, which are code the user chose to install.
A third way in is `include(path)` (the `--include` flag): a file or folder of the user's, imported by the command
line only, never named by a config.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from collections.abc import Callable, Iterator, Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import Generic, TypeVar

from unlearn.core.errors import UserError, shown

T = TypeVar("T")


class UnknownName(UserError, ValueError):
    """A name no component is registered under. A UserError for the CLI (exit 2), and a ValueError for the
    builders that report every bad option as one (build_optimizer, build_method)."""


_BY_KIND: dict[str, Registry] = {}


def registry_of(kind: str) -> Registry | None:
    """The registry of one kind of component ("method", "optimizer", ...), once its module is imported."""
    return _BY_KIND.get(kind)


class PluginError(UserError):
    """A plug-in (an entry point or an --include file) that does not load: one line naming it."""


def _import_members(package: str) -> None:
    """Import every module of `package` (and of its subpackages): their decorators register the built-ins."""
    root = importlib.import_module(package)
    for info in pkgutil.walk_packages(getattr(root, "__path__", []), prefix=package + "."):
        importlib.import_module(info.name)


INCLUDED: list[Path] = []  # files imported through include(), in order: a study's worker processes repeat them


def include(path: Path) -> list[str]:
    """Import the user's own component file (or every `*.py` file of a folder, sorted) so that its decorators
    register it; returns the module names. The path comes from the command line (--include), never a config."""
    path = Path(path)
    files = sorted(p for p in path.glob("*.py") if p.is_file()) if path.is_dir() else [path]
    if not path.exists() or not files or any(p.suffix != ".py" for p in files):
        raise PluginError(f"--include {shown(str(path))}: not a .py file or a folder holding some")
    names = []
    for file in files:
        resolved = file.resolve()
        if resolved in INCLUDED:
            continue
        name = f"unlearn_include_{len(INCLUDED)}_{file.stem}"
        spec = importlib.util.spec_from_file_location(name, resolved)
        if spec is None or spec.loader is None:
            raise PluginError(f"--include {shown(str(file))}: cannot be imported")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - the user's code: its failure is one line naming the file
            del sys.modules[name]
            raise PluginError(f"--include {shown(str(file))} failed to import: {type(err).__name__}: {err}") from err
        INCLUDED.append(resolved)
        names.append(name)
    return names


class Registry(Mapping[str, T], Generic[T]):
    """name -> component. Iterating gives the canonical names; lookups also accept aliases."""

    def __init__(self, kind: str, check: Callable[[str, T], None] | None = None, members: str | None = None) -> None:
        self.kind = kind
        self._check = check  # what every member must declare (e.g. an optimizer's grade); raises TypeError
        self._members: dict[str, T] = {}
        self._aliases: dict[str, str] = {}
        self.package = members  # the package whose modules hold the built-in members
        self.group = f"unlearn.{kind}s"  # the entry-point group plug-in distributions declare members in
        self._found = False
        _BY_KIND[kind] = self

    def discover(self) -> None:
        """Import the built-in members and load the entry points of this registry's group, once."""
        if self._found:
            return
        self._found = True  # first: a member's module may read the registry while it is imported
        if self.package is not None:
            _import_members(self.package)
        for point in entry_points(group=self.group):
            try:
                loaded = point.load()
            except Exception as err:  # noqa: BLE001 - an installed plug-in's failure is one line naming it
                raise PluginError(f"{self.kind} plug-in '{point.name}' ({point.value}, entry point group "
                                  f"{self.group}) failed to load: {type(err).__name__}: {err}") from err
            taken = self._members.get(self._aliases.get(point.name, point.name))
            if taken is None:  # an entry point may name an undecorated component: it registers as named
                self.register(point.name)(loaded)
            elif taken is not loaded:
                raise PluginError(f"{self.kind} plug-in '{point.name}' ({point.value}): the name is taken by "
                                  f"{getattr(taken, '__module__', '?')}.{getattr(taken, '__qualname__', taken)}")

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
        self.discover()
        if name in self._members:
            return name
        if isinstance(name, str) and name in self._aliases:
            return self._aliases[name]
        raise UnknownName(f"unknown {self.kind} {shown(name)}; choose from: {', '.join(self.choices())}")

    def lookup(self, name: str) -> T:
        return self._members[self.canonical(name)]

    def choices(self) -> list[str]:
        """Every name a config may use, aliases included."""
        self.discover()
        return sorted([*self._members, *self._aliases])

    def aliases(self, name: str) -> list[str]:
        self.discover()
        return sorted(a for a, target in self._aliases.items() if target == name)

    def __getitem__(self, name: str) -> T:
        try:
            return self.lookup(name)
        except UnknownName:
            raise KeyError(name) from None

    def __contains__(self, name: object) -> bool:
        self.discover()
        return isinstance(name, str) and (name in self._members or name in self._aliases)

    def __iter__(self) -> Iterator[str]:
        self.discover()
        return iter(self._members)

    def __len__(self) -> int:
        self.discover()
        return len(self._members)
