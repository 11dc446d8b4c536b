"""The typed registry that registration hooks fill, and the one place that validates them."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from aipaint.errors import AipaintWarning, PluginError, UnknownName

T = TypeVar("T")


def normalise_name(name: str) -> str:
    """Names match case-insensitively and ignore spaces, dashes and underscores."""
    return "".join(ch for ch in name.lower() if ch not in " -_")


@dataclass
class Catalogue(Generic[T]):
    """Named things of one kind (samplers, families, …) with aliases and owners."""

    kind: str
    name_attribute: str = "name"  # option groups are named by their ``namespace``
    items: dict[str, T] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)
    _lookup: dict[str, str] = field(default_factory=dict)

    def add(self, item: T, owner: str) -> None:
        name = getattr(item, self.name_attribute, None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {owner!r} registered a {self.kind} without a name: {item!r}")
        aliases = tuple(getattr(item, "aliases", ()) or ())
        keys = [normalise_name(name), *(normalise_name(a) for a in aliases)]
        for key in keys:
            if key in self._lookup:
                existing = self._lookup[key]
                warnings.warn(
                    f"plugin {owner!r} tried to register {self.kind} {name!r}, but "
                    f"{existing!r} from plugin {self.owners[existing]!r} already uses that name; "
                    f"the new one is ignored",
                    AipaintWarning,
                    stacklevel=3,
                )
                return
        self.items[name] = item
        self.owners[name] = owner
        for key in keys:
            self._lookup[key] = name

    def get(self, name: str) -> T:
        key = self._lookup.get(normalise_name(name)) if isinstance(name, str) else None
        if key is None:
            raise UnknownName(self.kind, name, list(self.items))
        return self.items[key]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and normalise_name(name) in self._lookup

    def __iter__(self):
        return iter(self.items.values())

    def names(self) -> list[str]:
        return list(self.items)


@dataclass
class Registry:
    """Everything the loaded plugins registered."""

    families: Catalogue[Any] = field(default_factory=lambda: Catalogue("model family"))
    samplers: Catalogue[Any] = field(default_factory=lambda: Catalogue("sampler"))
    adapters: Catalogue[Any] = field(default_factory=lambda: Catalogue("adapter"))
    postprocessors: Catalogue[Any] = field(default_factory=lambda: Catalogue("post-processor"))
    preprocessors: Catalogue[Any] = field(default_factory=lambda: Catalogue("preprocessor"))
    runtimes: Catalogue[Any] = field(default_factory=lambda: Catalogue("runtime"))
    options: Catalogue[Any] = field(default_factory=lambda: Catalogue("option group", name_attribute="namespace"))

    def registrar(self, catalogue: Catalogue[Any], owner: str, expected: type | None) -> Callable[[Any], None]:
        def register(item: Any) -> None:
            if catalogue is self.options:  # option groups are registered as classes
                wrong = not (isinstance(item, type) and expected is not None and issubclass(item, expected))
                wanted = "a subclass"
            else:
                wrong = expected is not None and not isinstance(item, expected)
                wanted = "an instance"
            if wrong:
                assert expected is not None
                raise PluginError(
                    f"plugin {owner!r} registered {item!r} as a {catalogue.kind}; "
                    f"expected {wanted} of {expected.__module__}.{expected.__qualname__}"
                )
            catalogue.add(item, owner)

        return register


def iter_names(items: Iterable[Any]) -> list[str]:
    return [getattr(i, "name", repr(i)) for i in items]
