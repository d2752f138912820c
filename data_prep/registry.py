"""Name -> object registries for the pipeline's extension points (transform kinds, tasks).

    @TRANSFORM_KINDS.register
    class Similarity(TransformKind):
        name = "similarity"
        ...

A new entry is one class with a `name`, registered where it is defined: the choice lists of the
config and the errors for an unknown name read the registry, so nothing else names the entries.
Torch-free: the config validates its choices without importing torch.
"""
from __future__ import annotations

from typing import Dict, Generic, Iterator, Tuple, Type, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """One instance per registered class, looked up by the class's `name`."""

    def __init__(self, what: str):
        self.what = what                  # e.g. "transform kind": the errors' wording
        self._entries: Dict[str, T] = {}

    def register(self, cls: Type[T]) -> Type[T]:
        """Class decorator: registers an instance of `cls` under `cls.name`."""
        name = cls.name  # type: ignore[attr-defined]
        if name in self._entries:
            raise ValueError(f"{self.what} '{name}' registered twice")
        self._entries[name] = cls()
        return cls

    def unregister(self, name: str) -> None:
        """Remove an entry (tests register their own and take it out again)."""
        del self._entries[name]

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise ValueError(self.unknown(name))
        return self._entries[name]

    def unknown(self, name: object) -> str:
        return f"unknown {self.what} '{name}'; expected one of {', '.join(self.names())}"

    def names(self) -> Tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[T]:
        return iter(self._entries.values())
