"""Fair dispatch across owners: weighted round-robin over per-owner FIFO queues.

Jobs of one owner (an API key's name, or "anonymous") leave in the order they came; owners take turns,
each turn worth its weight in jobs (credits carry over within a turn, so weight 0.5 is a job every
other turn). An owner that has nothing waiting leaves the ring and comes back at its end, with no saved
credit. So a client that floods the queue delays only itself: a new owner's first job leaves within one
turn of every owner waiting, whatever the flood's length. Plain Python, no I/O.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    def __init__(self) -> None:
        self._queues: OrderedDict[str, deque[T]] = OrderedDict()  # the ring, in turn order
        self._weights: dict[str, float] = {}
        self._credit: dict[str, float] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, owner: str, item: T, weight: float = 1.0) -> None:
        if owner not in self._queues:
            self._queues[owner] = deque()
            self._credit[owner] = 0.0
        self._weights[owner] = max(weight, 0.01)
        self._queues[owner].append(item)
        self._size += 1

    def pop(self) -> T:
        """The next item in fair order; IndexError when empty."""
        if not self._size:
            raise IndexError("pop from an empty FairQueue")
        while True:
            owner = next(iter(self._queues))
            if self._credit[owner] < 1.0:  # its turn begins
                self._credit[owner] += self._weights[owner]
                if self._credit[owner] < 1.0:  # a weight below 1 saves up over several turns
                    self._queues.move_to_end(owner)
                    continue
            break
        self._credit[owner] -= 1.0
        queue = self._queues[owner]
        item = queue.popleft()
        self._size -= 1
        if not queue:
            del self._queues[owner], self._credit[owner], self._weights[owner]
        elif self._credit[owner] < 1.0:  # its turn is over
            self._queues.move_to_end(owner)
        return item
