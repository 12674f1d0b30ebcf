"""Block tables for sequences: what a sequence needs from the `BlockPool`, taken and given back.

- Understanding: one row. At admission its full blocks are looked up in the content cache by their
  chained keys (`Sequence.cache_keys`, kept current by the engine) and only the rest is allocated;
  at least the last position is always computed (its hidden state picks the next token). The row
  grows by one block whenever a decode step starts a new one.
- Generation: 2n rows laid out [cond_0, uncond_0, cond_1, uncond_1, ...], each of prompt + image
  tokens - 1 positions, all taken at admission (a generation never grows or needs preempting). The
  full prompt blocks of each CFG side are held once, by reference from all n images' rows; the
  partial last prompt block is the first of each image's own blocks (the engine copies it).
- Flow generation (`Sequence.flow`): two rows, the conditional prompt and the unconditional BOS,
  held once for the request; its images and ODE steps all attend to them (nothing per image).

This module knows blocks, positions and keys; not tensors, tokens or requests' meaning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from janus_core.engine.memory import blocks_for
from janus_core.sched.block_pool import BlockPool

if TYPE_CHECKING:
    from janus_core.sched.scheduler import Sequence


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
        if seq.flow:
            return blocks_for(seq.prompt_tokens, self.bs) + 1
        if seq.kind == "generate":
            shared = seq.prompt_tokens // self.bs
            return 2 * (shared + seq.width * (blocks_for(seq.row_len, self.bs) - shared))
        return blocks_for(seq.row_len, self.bs)

    def fits(self, seq: Sequence) -> bool:
        """Whether `seq` could ever run: its whole final size within the pool."""
        return self.blocks_needed(seq) <= self.pool.num_blocks

    # --- taking and giving back -----------------------------------------------------------------
    def admit(self, seq: Sequence) -> bool:
        """Take the blocks `seq` needs now (its tables are set), or take nothing and return False."""
        if seq.flow:
            return self._admit_flow(seq)
        return self._admit_generation(seq) if seq.kind == "generate" else self._admit_understanding(seq)

    def _admit_flow(self, seq: Sequence) -> bool:
        if self.blocks_needed(seq) > self.pool.num_free:
            return False
        cond = self.pool.allocate(blocks_for(seq.prompt_tokens, self.bs))
        uncond = self.pool.allocate(1)
        assert cond is not None and uncond is not None
        seq.tables, seq.cached_tokens = [cond, uncond], 0
        return True

    def _admit_understanding(self, seq: Sequence) -> bool:
        length = seq.kv_len
        cached: list[int] = []
        if self.prefix_caching:
            cached = self.pool.lookup(seq.cache_keys[:(length - 1) // self.bs])
        new = blocks_for(length, self.bs) - len(cached)
        if new + self.pool.cost(cached) > self.pool.num_free:
            return False
        self.pool.take(cached)
        room = min(blocks_for(seq.row_len, self.bs) - blocks_for(length, self.bs), self.room_to_grow)
        fresh = self.pool.allocate(new, after=cached[-1] if cached else None, reserve=room)
        assert fresh is not None
        seq.tables, seq.reserved = [cached + fresh], self.pool.reserved
        seq.cached_tokens = len(cached) * self.bs
        return True

    def _admit_generation(self, seq: Sequence) -> bool:
        n, shared = seq.width, seq.prompt_tokens // self.bs
        own = blocks_for(seq.row_len, self.bs) - shared
        if 2 * (shared + n * own) > self.pool.num_free:
            return False
        tables: list[list[int]] = [[], []]
        for side in (0, 1):  # the image-0 row of each side gets its own blocks right after the prompt's
            blocks = self.pool.allocate(shared + own)
            assert blocks is not None
            self.pool.share(blocks[:shared], n - 1)
            tables[side] = blocks
        for _ in range(1, n):
            for side in (0, 1):
                blocks = self.pool.allocate(own)
                assert blocks is not None
                tables.append(tables[side][:shared] + blocks)
        seq.tables = tables
        seq.cached_tokens = 0
        return True

    def grow(self, seq: Sequence) -> bool:
        """Make room for positions [0, seq.kv_len) of an understanding row; False if the pool is dry."""
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
        """Put the row's full blocks that have keys into the content cache (understanding rows only)."""
        if not self.prefix_caching or seq.kind != "understand" or not seq.tables:
            return
        table = seq.tables[0]
        for b in range(seq.registered, min(len(seq.cache_keys), len(table))):
            if self.pool.blocks[table[b]].key is None:  # a reused block is in the cache already
                self.pool.register(table[b], seq.cache_keys[b])
            seq.registered = b + 1
