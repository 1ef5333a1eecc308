"""Name -> object registries with errors that list the known names."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A user-facing configuration error.

    The message is one line that names the bad value and what is allowed; the CLI prints
    it as ``error: <message>`` and exits non-zero without touching the results store.
    """


def first_line(e: BaseException | str | None, default: str = "") -> str:
    """The first line of an exception's message (tracebacks and SQL are multi-line), or its
    type name; of a text (e.g. a stored traceback), or ``default`` when it is empty."""
    text = (str(e) if e is not None else "").strip()
    if text:
        return text.splitlines()[0]
    return type(e).__name__ if isinstance(e, BaseException) else default


class Registry(Generic[T]):
    """A small ordered mapping from names to objects (factories, specs...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        if name in self._items:
            raise KeyError(f"{self.kind} {name!r} registered twice")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; known: {', '.join(self._items)}"
            ) from None

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)
