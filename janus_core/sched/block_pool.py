"""KV blocks as plain Python: a reference-counted pool with a content-addressed cache of full blocks.

The KV memory of the engine is `num_blocks` blocks of `block_size` token positions each. A row of
the decode batch (an understanding sequence, or one CFG row of one image) owns a block table: the
ids of the blocks that hold its positions 0, bs, 2bs, ... Blocks are reference-counted, so rows
share blocks (the prompt of a request's n images, a cached system prompt, an image prefix, earlier
turns of a conversation).

A full block whose contents are known (text tokens and image content, computed from position 0)
can be registered under a *chained* key: the key of the block before it plus its own token ids and
the content keys of the images whose positions it holds (every image is the same placeholder ids,
so ids alone would let two different images collide). When the last reference goes, a registered
block stays in the cache, free but reusable, until the pool needs it: free blocks without a key
are handed out first, then cached ones, least recently freed first.

This module knows block ids, counts and keys; not tensors, tokens' meaning or requests.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

BLOCK_SIZE = 16


def chain_keys(ids: Sequence[int], block_size: int, spans: Sequence[tuple[int, int, str]] = (),
               prev: bytes | None = None, first: int = 0) -> list[bytes]:
    """Keys of the full blocks of `ids` (positions `first*block_size` on), each chained to the one before.

    `spans` are `(start, end, content_key)` position ranges whose embeddings are not the token ids'
    (images); a block's key covers every span that overlaps it.
    """
    keys: list[bytes] = []
    for b in range(first, len(ids) // block_size):
        lo, hi = b * block_size, (b + 1) * block_size
        h = hashlib.blake2b(prev or b"", digest_size=16)
        h.update(b",".join(str(t).encode() for t in ids[lo:hi]))
        for start, end, key in spans:
            if start < hi and end > lo:
                h.update(f"|{start}:{end}:{key}".encode())
        prev = h.digest()
        keys.append(prev)
    return keys


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    key: bytes | None = None  # set while the block is in the content cache


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int = BLOCK_SIZE) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._plain: set[int] = set(range(num_blocks))  # free, no key: handed out first
        self._reserved: set[int] = set()  # plain free blocks kept after a row for it to grow into, if possible
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # free with a key, oldest first
        self._by_key: dict[bytes, int] = {}
        self.evictions = 0

    # --- counts -----------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take now (cached free blocks included: they are evicted on demand)."""
        return len(self._plain) + len(self._cached_free)

    @property
    def num_cached_free(self) -> int:
        return len(self._cached_free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    # --- allocation -------------------------------------------------------------------------------
    def allocate(self, n: int, after: int | None = None, reserve: int = 0) -> list[int] | None:
        """`n` blocks with one reference each, or None (nothing taken) when fewer are free.

        Consecutive ids where possible (a row whose blocks are consecutive is attended in one piece):
        right after block `after` when those are free (a row growing into the room kept for it), else the
        first run of `n` free ids. `reserve` more blocks after the run are kept free for the same row to
        grow into (`reserved`); others take them only when nothing else is free, before cached blocks.
        """
        self.reserved: list[int] = []
        if n > self.num_free:
            return None
        if n == 0:
            return []
        chosen = None
        if after is not None and all(after + 1 + k in self._plain for k in range(n)):
            chosen = list(range(after + 1, after + 1 + n))
        if chosen is None and reserve:
            run = self._first_run(n + reserve)
            if run is not None:
                chosen, self.reserved = run[:n], run[n:]
                self._reserved.update(self.reserved)
        if chosen is None:
            chosen = self._first_run(n)
        if chosen is None:
            unreserved = sorted(self._plain - self._reserved)[:n]
            spare = sorted(self._reserved)[:n - len(unreserved)]
            chosen = unreserved + spare + self._evict(n - len(unreserved) - len(spare))
        for i in chosen:
            self._plain.discard(i)
            self._reserved.discard(i)
            self.blocks[i].ref_count = 1
        return chosen

    def _first_run(self, n: int) -> list[int] | None:
        """The lowest run of `n` consecutive free, unreserved ids."""
        free = self._plain - self._reserved
        if len(free) < n:
            return None
        if n == 1:
            return [min(free)]
        run: list[int] = []
        for i in sorted(free):
            run = [*run, i] if run and i == run[-1] + 1 else [i]
            if len(run) == n:
                return run
        return None

    def _evict(self, n: int) -> list[int]:
        taken = []
        for _ in range(n):
            i, _ = self._cached_free.popitem(last=False)
            block = self.blocks[i]
            del self._by_key[block.key]  # type: ignore[arg-type]
            block.key = None
            self.evictions += 1
            taken.append(i)
        return taken

    def unreserve(self, block_ids: Sequence[int]) -> None:
        """Give up the room kept for a row (it finished or was preempted)."""
        self._reserved.difference_update(block_ids)

    def share(self, block_ids: Sequence[int], times: int = 1) -> None:
        """Add `times` references to blocks already held (a request's prompt shared by its images)."""
        for i in block_ids:
            self.blocks[i].ref_count += times

    def release(self, block_ids: Sequence[int]) -> None:
        """Drop one reference per listed id; a block with none left becomes free (and stays cached if keyed)."""
        for i in block_ids:
            block = self.blocks[i]
            if block.ref_count <= 0:
                raise ValueError(f"block {i} released more often than it was taken")
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.key is not None:
                    self._cached_free[i] = None
                else:
                    self._plain.add(i)

    # --- content cache ----------------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `keys`, without taking them (see `take`)."""
        found = []
        for key in keys:
            i = self._by_key.get(key)
            if i is None:
                break
            found.append(i)
        return found

    def cost(self, cached: Sequence[int]) -> int:
        """Free blocks that taking `cached` would use up (those nobody holds now)."""
        return sum(1 for i in cached if self.blocks[i].ref_count == 0)

    def take(self, cached: Sequence[int]) -> None:
        """One more reference to each of `cached` (from `lookup`); free ones leave the free list."""
        for i in cached:
            block = self.blocks[i]
            if block.ref_count == 0:
                self._cached_free.pop(i)
            block.ref_count += 1

    def register(self, block_id: int, key: bytes) -> bool:
        """Put a held, fully written block in the cache under `key`; False if the key is there already."""
        block = self.blocks[block_id]
        if key in self._by_key or block.key is not None:
            return False
        block.key = key
        self._by_key[key] = block_id
        return True

    def clear_cache(self) -> None:
        """Forget every cached key (held blocks keep their data; free ones become plain free blocks)."""
        for i in self._cached_free:
            self._plain.add(i)
        self._cached_free.clear()
        for block in self.blocks:
            block.key = None
        self._by_key.clear()
