"""A sequence: one request as the scheduler and the KV manager see it, and its row layout. Plain Python.

A `Sequence` holds counts (prompt tokens, decode steps to take, the stop token), its row layout and,
while admitted, its block tables. What the engine keeps for the request rides along in `data`, which
the scheduling layer never reads.

Row layouts say how a sequence's rows sit in the KV pool, one class per kind of sequence:
- `TextRow` (understanding): one row that grows by a position per decode step. At admission its
  full blocks are looked up in the content cache by their chained keys (`Sequence.cache_keys`) and
  only the rest is allocated; at least the last position is always computed (its hidden state picks
  the next token).
- `CfgPairRows` (VQ generation): 2n rows laid out [cond_0, uncond_0, cond_1, uncond_1, ...], each of
  prompt + image tokens - 1 positions, all taken at admission (never grows, never preempted). The full
  prompt blocks of each CFG side are held once, by reference from all n images' rows; the partial last
  prompt block is the first of each image's own blocks (the batch copies it).
- `FlowRows` (JanusFlow): two rows, the conditional prompt and the unconditional BOS, held once for
  the request; its images and ODE steps all attend to them (nothing per image).

A layout is chosen when the sequence is built (by its batch); the KV manager and the scheduler ask it
instead of asking what kind of request a sequence is.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

from janus_core.sched.block_pool import BLOCK_SIZE, BlockPool

KINDS = ("understand", "generate")
_arrivals = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


def blocks_for(tokens: int, block_size: int = BLOCK_SIZE) -> int:
    return -(-tokens // block_size)


def cfg_pair_blocks(prompt_tokens: int, row_len: int, n: int, block_size: int = BLOCK_SIZE) -> int:
    """Blocks n images' CFG pairs hold: full prompt blocks once per side, the rest of each row per image."""
    shared = prompt_tokens // block_size
    return 2 * (shared + n * (blocks_for(row_len, block_size) - shared))


class RowLayout:
    grows = False  # the row extends as the sequence decodes (the scheduler makes room, or preempts)
    cacheable = False  # its full blocks may enter the content cache

    def kv_len(self, seq: Sequence) -> int:
        """Positions each row must hold for the next forward pass (a prefill, or the next decode step)."""
        return seq.row_len

    def prefill_tokens(self, seq: Sequence) -> int:
        """Tokens the (re)admission prefill computes, at most."""
        raise NotImplementedError

    def blocks_needed(self, seq: Sequence, block_size: int) -> int:
        """Blocks `seq` holds once admitted with nothing cached."""
        raise NotImplementedError

    def admit(self, seq: Sequence, pool: BlockPool, *, prefix_caching: bool, room_to_grow: int) -> bool:
        """Take the blocks `seq` needs now and set its tables, or take nothing and return False."""
        raise NotImplementedError

    def describe(self, seq: Sequence) -> str:
        """What the sequence holds, for the message that refuses one the pool could never fit."""
        raise NotImplementedError


class TextRow(RowLayout):
    grows = True
    cacheable = True

    def kv_len(self, seq: Sequence) -> int:
        return seq.prompt_tokens + seq.num_generated

    def prefill_tokens(self, seq: Sequence) -> int:
        return self.kv_len(seq)

    def blocks_needed(self, seq: Sequence, block_size: int) -> int:
        return blocks_for(seq.row_len, block_size)

    def admit(self, seq: Sequence, pool: BlockPool, *, prefix_caching: bool, room_to_grow: int) -> bool:
        bs, length = pool.block_size, self.kv_len(seq)
        cached: list[int] = pool.lookup(seq.cache_keys[:(length - 1) // bs]) if prefix_caching else []
        new = blocks_for(length, bs) - len(cached)
        if new + pool.cost(cached) > pool.num_free:
            return False
        pool.take(cached)
        room = min(blocks_for(seq.row_len, bs) - blocks_for(length, bs), room_to_grow)
        fresh = pool.allocate(new, after=cached[-1] if cached else None, reserve=room)
        assert fresh is not None
        seq.tables, seq.reserved = [cached + fresh], pool.reserved
        seq.cached_tokens = len(cached) * bs
        return True

    def describe(self, seq: Sequence) -> str:
        return f"a prompt of {seq.prompt_tokens} tokens plus max_new_tokens {seq.max_steps}"


class CfgPairRows(RowLayout):
    def prefill_tokens(self, seq: Sequence) -> int:
        return 2 * seq.prompt_tokens

    def blocks_needed(self, seq: Sequence, block_size: int) -> int:
        return cfg_pair_blocks(seq.prompt_tokens, seq.row_len, seq.width, block_size)

    def admit(self, seq: Sequence, pool: BlockPool, *, prefix_caching: bool, room_to_grow: int) -> bool:
        bs, n = pool.block_size, seq.width
        shared = seq.prompt_tokens // bs
        own = blocks_for(seq.row_len, bs) - shared
        if self.blocks_needed(seq, bs) > pool.num_free:
            return False
        tables: list[list[int]] = [[], []]
        for side in (0, 1):  # the image-0 row of each side gets its own blocks right after the prompt's
            blocks = pool.allocate(shared + own)
            assert blocks is not None
            pool.share(blocks[:shared], n - 1)
            tables[side] = blocks
        for _ in range(1, n):
            for side in (0, 1):
                blocks = pool.allocate(own)
                assert blocks is not None
                tables.append(tables[side][:shared] + blocks)
        seq.tables, seq.cached_tokens = tables, 0
        return True

    def describe(self, seq: Sequence) -> str:
        return f"{seq.width} image(s) of {seq.prompt_tokens} prompt + {seq.max_steps} image tokens with CFG"


class FlowRows(RowLayout):
    def prefill_tokens(self, seq: Sequence) -> int:
        return seq.prompt_tokens + 1

    def blocks_needed(self, seq: Sequence, block_size: int) -> int:
        return blocks_for(seq.prompt_tokens, block_size) + 1

    def admit(self, seq: Sequence, pool: BlockPool, *, prefix_caching: bool, room_to_grow: int) -> bool:
        if self.blocks_needed(seq, pool.block_size) > pool.num_free:
            return False
        cond = pool.allocate(blocks_for(seq.prompt_tokens, pool.block_size))
        uncond = pool.allocate(1)
        assert cond is not None and uncond is not None
        seq.tables, seq.cached_tokens = [cond, uncond], 0
        return True

    def describe(self, seq: Sequence) -> str:
        return f"a flow prompt of {seq.prompt_tokens} tokens (cond and uncond rows)"


TEXT, CFG_PAIR, FLOW = TextRow(), CfgPairRows(), FlowRows()


@dataclass(eq=False)
class Sequence:
    request_id: str
    kind: str  # "understand" | "generate"
    prompt_tokens: int  # per row
    max_steps: int  # decode steps at most: answer tokens (max_new_tokens), codes per image, or ODE steps
    width: int = 1  # images of a generation request (two rows each); 1 for understanding
    stop_token: int | None = None  # understanding's EOS; generation has none
    status: Status = Status.WAITING
    num_generated: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    cache_keys: list[bytes] = field(default_factory=list)  # chained keys of the row's full blocks so far
    tables: list[list[int]] = field(default_factory=list)  # block table per row, while admitted
    reserved: list[int] = field(default_factory=list)  # free blocks kept after the row for it to grow into
    cached_tokens: int = 0  # positions found in the content cache at the last admission
    registered: int = 0  # leading blocks of the row already offered to the content cache
    preemptions: int = 0
    arrival: int = field(default_factory=lambda: next(_arrivals))
    data: Any = None  # the engine's per-request state
    stamps: dict[str, float] = field(default_factory=dict)  # when (epoch s) it reached each phase (the engine's)
    layout: RowLayout | None = None  # None: a text row for understanding, CFG pairs for generation

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.layout is None:
            self.layout = TEXT if self.kind == "understand" else CFG_PAIR
        if self.layout.grows != (self.kind == "understand"):
            raise ValueError(f"a {self.kind} sequence cannot have a {type(self.layout).__name__} layout")
        if self.width < 1 or (self.kind == "understand" and self.width != 1):
            raise ValueError(f"width must be 1 for understanding and at least 1 for generation, got {self.width}")
        if self.prompt_tokens < 1 or self.max_steps < 1:
            raise ValueError(f"prompt_tokens and max_steps must be at least 1, got {self.prompt_tokens}, "
                             f"{self.max_steps}")

    @property
    def row_len(self) -> int:
        """Positions a row holds at most: the last token is sampled, never fed back."""
        return self.prompt_tokens + self.max_steps - 1

    @property
    def kv_len(self) -> int:
        """Positions a row must hold for its next forward pass (a prefill, or the next decode step)."""
        return self.layout.kv_len(self)

    @property
    def prefill_tokens(self) -> int:
        """Tokens the (re)admission prefill computes, at most."""
        return self.layout.prefill_tokens(self)
