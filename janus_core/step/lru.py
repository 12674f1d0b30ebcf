"""A byte-bounded least-recently-used map, for the vision-feature cache (KV blocks keep their own).

It knows sizes and recency, not what the values are: the caller says how many bytes each value
holds. Inserting past the budget evicts the least recently used entries; a value larger than the
whole budget is not stored at all.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class ByteLRU(Generic[V]):
    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def get(self, key: Hashable) -> V | None:
        """The value (now the most recently used), or None; counts a hit or a miss."""
        found = self._items.get(key)
        if found is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return found[0]

    def put(self, key: Hashable, value: V, nbytes: int) -> bool:
        """Store `value`; False when it is bigger than the whole budget (and so not kept)."""
        if nbytes > self.max_bytes:
            return False
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        while self._items and self.bytes + nbytes > self.max_bytes:
            _, (_, size) = self._items.popitem(last=False)
            self.bytes -= size
            self.evictions += 1
        self._items[key] = (value, nbytes)
        self.bytes += nbytes
        return True

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0
