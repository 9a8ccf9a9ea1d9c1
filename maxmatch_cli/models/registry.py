"""Name-keyed tables of model components, so a recipe string selects a builder without if/elif chains."""

from __future__ import annotations

import difflib
from typing import Callable, Generic, TypeVar

from maxmatch_cli.errors import MaxMatchError

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """A table of builders keyed by name, each with a one-line description for listings.

    Args:
        kind: What the entries are (used in error messages), e.g. ``"image encoder"``.
        key: The recipe key that selects an entry, e.g. ``"model.image_encoder"``.
    """

    def __init__(self, kind: str, key: str):
        self.kind = kind
        self.key = key
        self._builders: dict[str, F] = {}
        self._descriptions: dict[str, str] = {}

    def register(self, name: str, description: str) -> Callable[[F], F]:
        """Decorator adding a builder under ``name``."""

        def add(fn: F) -> F:
            if name in self._builders:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._builders[name] = fn
            self._descriptions[name] = description
            return fn

        return add

    def get(self, name: str) -> F:
        """The builder for ``name``; an unknown name raises MaxMatchError with the nearest valid one."""
        try:
            return self._builders[name]
        except KeyError:
            near = difflib.get_close_matches(name, list(self._builders), n=1)
            hint = f"did you mean '{near[0]}'? " if near else ""
            raise MaxMatchError(f"unknown {self.kind} '{name}'",
                                hint=f"{hint}set {self.key} to one of: {', '.join(self._builders)}") from None

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._builders)

    def describe(self) -> dict[str, str]:
        """Name -> one-line description."""
        return dict(self._descriptions)

    def __contains__(self, name: object) -> bool:
        return name in self._builders
