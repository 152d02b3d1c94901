"""One registry class for every kind of part (loss, init, corpus, ...), keyed by the YAML name."""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from kdistill.errors import ConfigError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str, where: str = "") -> T:
        if not isinstance(name, str):
            raise ConfigError(f"a {self.kind} name{' at ' + where if where else ''} is one name (a string), got "
                              f"{type(name).__name__} {name!r}; valid: {', '.join(sorted(self._items))}")
        if name not in self._items:
            raise ConfigError(self.unknown_message(name, where))
        return self._items[name]

    def unknown_message(self, name: str, where: str = "") -> str:
        msg = f"unknown {self.kind} {name!r}" + (f" at {where}" if where else "")
        return msg + f"{did_you_mean(name, self._items)} valid: {', '.join(sorted(self._items))}"

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
