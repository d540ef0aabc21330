"""A least-recently-used cache with an optional entry cap.

Callers choose the images and strings a served model sees, so every cache
filled from them needs a cap; each user states its own and what it costs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """At most `max_entries` values (None: no cap), and, given `weigh`, at most `max_weight` in all; a new
    entry beyond either cap drops the least recently used, and one that alone weighs more is not kept."""

    def __init__(self, max_entries: int | None, *, max_weight: int | None = None,
                 weigh: Callable[[V], int] | None = None):
        if (max_weight is None) != (weigh is None):
            raise ValueError("max_weight and weigh go together: give both or neither")
        self._max_entries, self._max_weight, self._weigh = max_entries, max_weight, weigh
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._weight = 0

    def get(self, key: K) -> V | None:
        """The value, now the most recently used; None if absent."""
        if key not in self._entries:
            return None
        self._entries.move_to_end(key)
        return self._entries[key]

    def get_many(self, keys: Iterable[K]) -> dict[K, V]:
        """The cached values among `keys`, each now recently used, in a dict of the caller's own: it adds what it
        computes and reads its whole result from it, even where its puts evicted some (more new keys than the cap)."""
        return {key: value for key in dict.fromkeys(keys) if (value := self.get(key)) is not None}

    def put(self, key: K, value: V) -> None:
        if key in self._entries:
            self._drop(key)
        weight = self._weigh(value) if self._weigh is not None else 0
        if self._max_weight is not None and weight > self._max_weight:
            return  # not kept: it would push out everything else
        self._entries[key] = value
        self._weight += weight
        while self._entries and self._over():
            self._drop(next(iter(self._entries)))

    def _over(self) -> bool:
        return ((self._max_entries is not None and len(self._entries) > self._max_entries)
                or (self._max_weight is not None and self._weight > self._max_weight))

    def _drop(self, key: K) -> None:
        value = self._entries.pop(key)
        self._weight -= self._weigh(value) if self._weigh is not None else 0

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> Iterator[tuple[K, V]]:
        """Least recently used first, so putting them back in this order rebuilds the same order."""
        return iter(self._entries.items())
