"""A dict that starts over when full: the bounded memo the services keep per version."""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class CappedDict(dict[K, V]):
    """A memo of at most ``cap`` entries that is emptied when a new key would exceed it.

    The services memoise per model version (answer templates, reasons,
    derived top-list answers) under keys that requests choose. A memo that
    stops adding at its cap keeps whatever came first for the version's
    whole life, so once distinct requests (or a caller sending distinct
    values) have filled it, every later miss stays a miss. Starting over
    lets the keys in use now fill it again, and costs nothing on a hit:
    ``get`` is the plain ``dict`` one, where an LRU would reorder on every
    read of the hot path.
    """

    __slots__ = ("cap",)

    def __init__(self, cap: int) -> None:
        super().__init__()
        if cap < 1:
            raise ValueError("cap must be at least 1")
        self.cap = cap

    def put(self, key: K, value: V) -> None:
        """Stores ``value``; empties the memo first when ``key`` is new and it is full."""
        if len(self) >= self.cap and key not in self:
            self.clear()
        self[key] = value
