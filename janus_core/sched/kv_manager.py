"""Block tables for sequences: what a sequence needs from the `BlockPool`, taken and given back.

How many blocks and which ones is each sequence's row layout's rule (`janus_core.sched.sequence`:
a text row, CFG pairs, flow rows); the manager adds what is common: whether a sequence could ever
fit, growing a text row by a block, giving blocks back, offering full blocks to the content cache.

This module knows blocks, positions and keys; not tensors, tokens or requests' meaning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from janus_core.sched.block_pool import BlockPool
from janus_core.sched.sequence import blocks_for

if TYPE_CHECKING:
    from janus_core.sched.sequence import Sequence


class KVManager:
    def __init__(self, pool: BlockPool, *, prefix_caching: bool = True, room_to_grow: int = 0) -> None:
        self.pool = pool
        self.prefix_caching = prefix_caching
        # Blocks kept free after an understanding row's prompt for its answer (at most this many), so the row
        # stays in one piece: the CPU attention reads a row, or rows at even spacing, in one call.
        self.room_to_grow = room_to_grow
        self.bs = pool.block_size

    # --- how much -------------------------------------------------------------------------------
    def blocks_needed(self, seq: Sequence) -> int:
        """Blocks `seq` holds once admitted with nothing cached: the planner's and `fits`' measure."""
        return seq.layout.blocks_needed(seq, self.bs)

    def fits(self, seq: Sequence) -> bool:
        """Whether `seq` could ever run: its whole final size within the pool."""
        return self.blocks_needed(seq) <= self.pool.num_blocks

    # --- taking and giving back -----------------------------------------------------------------
    def admit(self, seq: Sequence) -> bool:
        """Take the blocks `seq` needs now (its tables are set), or take nothing and return False."""
        return seq.layout.admit(seq, self.pool, prefix_caching=self.prefix_caching, room_to_grow=self.room_to_grow)

    def grow(self, seq: Sequence) -> bool:
        """Make room for positions [0, seq.kv_len) of a growing (text) row; False if the pool is dry."""
        table = seq.tables[0]
        missing = blocks_for(seq.kv_len, self.bs) - len(table)
        if missing <= 0:
            return True
        blocks = self.pool.allocate(missing, after=table[-1])
        if blocks is None:
            return False
        table += blocks
        seq.reserved = [b for b in seq.reserved if b not in blocks]
        return True

    def release(self, seq: Sequence) -> None:
        for table in seq.tables:  # tail first: a cached chain loses its least useful blocks first
            self.pool.release(table[::-1])
        self.pool.unreserve(seq.reserved)
        seq.tables, seq.reserved = [], []

    def register(self, seq: Sequence) -> None:
        """Put the row's full blocks that have keys into the content cache (text rows only)."""
        if not self.prefix_caching or not seq.layout.cacheable or not seq.tables:
            return
        table = seq.tables[0]
        for b in range(seq.registered, min(len(seq.cache_keys), len(table))):
            if self.pool.blocks[table[b]].key is None:  # a reused block is in the cache already
                self.pool.register(table[b], seq.cache_keys[b])
            seq.registered = b + 1
