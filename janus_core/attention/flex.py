"""Flex decode attention over the paged pool: a decode batch's block tables as one flex `BlockMask`.

One `flex_attention` call covers the whole batch: each row's query against the pool's slots, the mask listing
the row's physical blocks (so the kernel reads only those) and mapping a slot back to its position in the row.
The eager decode batch (`janus_core.attention.paged.DecodeBatch` with `PagedKV.attention == "flex"`) and the
static step (`janus_core.step.static`) build the same mask from the same compact block tables, on the device.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from janus_core.attention.paged import PagedKV


def bucket(rows: int) -> int:
    """The power of two a batch of `rows` is padded to, so a few compiled shapes serve every batch."""
    return 1 << max(rows - 1, 0).bit_length()


def compact_tables(tables: Sequence[Sequence[int]], positions: Sequence[int], block_size: int, padded: int,
                   width: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Rows with block tables `tables` feeding one token at `positions`, as the (padded, W) int32 block table
    `block_mask` takes (row r's first `used[r]` blocks; zeros after them and in padding rows) and `used`
    (rows,), the blocks each row reads, its new token's included. W is `width`, widened if a row needs more
    (a caller fixes it so a compiled or captured step keeps its shapes)."""
    pos = np.asarray(positions, dtype=np.int64)
    used = pos // block_size + 1
    width = max(width, int(used.max()) if len(pos) else 1)
    table = np.zeros((padded, width), dtype=np.int32)
    for r, t in enumerate(tables):
        table[r, :used[r]] = t[:used[r]]
    return table, used


class FlexBlocks:
    """A decode batch's block tables as one `BlockMask` over the whole pool, for `flex_attention`.

    Row b's query is query row b of batch element b; the keys are the pool's slots (one shared batch
    element). The mask lists each row's physical blocks, so the kernel reads only those, and its
    `mask_mod` maps a slot back to the row's position through a (rows, blocks) table of logical block
    indices (a block shared by several rows has one entry per row). Rows are padded to a power of two.
    """

    def __init__(self, kv: PagedKV, tables: Sequence[Sequence[int]], positions: Sequence[int]) -> None:
        self.kv, self.rows = kv, len(tables)
        device = kv.device
        padded = bucket(self.rows)
        table, used = compact_tables(tables, positions, kv.block_size, padded)
        counts = np.ones(padded, dtype=np.int32)  # rows after the batch read block 0 and see nothing of it
        counts[:self.rows] = used
        position = torch.tensor([*positions, *[-1] * (padded - self.rows)], device=device)  # -1: sees nothing
        self.mask = block_mask(kv, torch.from_numpy(counts).to(device)[:, None, None],
                               torch.from_numpy(table).to(device), position)
        self.padded = padded

    def attend(self, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        # q: (B, H, 1, D) -> (B, H, 1, D)
        if self.padded > self.rows:
            q = torch.cat([q, q.new_zeros((self.padded - self.rows, *q.shape[1:]))])
        flex = flex_kernel(q.is_cuda)
        out = flex(q, self.kv.k[layer][None], self.kv.v[layer][None], block_mask=self.mask, scale=scale)
        return out[:self.rows]


def expand_tables(table: torch.Tensor, counts: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """The (P, num_blocks) map from a physical block to its logical index in each row (-1: not the row's),
    from the rows' block tables `table` (P, W), of which row b uses its first `counts[b]` (distinct) blocks.
    Device ops only, so it traces into a compiled step and a CUDA graph: a few KB cross from the host per
    step, not the (P, num_blocks) map itself."""
    rows, width = table.shape
    logical = torch.arange(width, dtype=torch.int32, device=table.device).expand(rows, width)
    used = logical < counts.reshape(rows, 1)
    target = torch.where(used, table.long(), num_blocks)  # entries past a row's count go to a spare column
    to_logical = torch.full((rows, num_blocks + 1), -1, dtype=torch.int32, device=table.device)
    return to_logical.scatter_(1, target, logical)[:, :num_blocks]


def block_mask(kv: PagedKV, counts: torch.Tensor, table: torch.Tensor, positions: torch.Tensor):
    """The flex `BlockMask` of a decode batch over the whole pool: row b reads its `counts[b]` blocks
    `table[b]` (physical ids), and sees a slot when its block's logical index puts it at or before the row's
    position. Shared by the eager and the static step; built from device ops only."""
    from torch.nn.attention.flex_attention import BlockMask  # torch >= 2.5; imported where it is used

    bs, blocks = kv.block_size, kv.num_blocks
    to_logical = expand_tables(table, counts, blocks)

    def visible(b, h, q_idx, kv_idx):
        block = to_logical[b, kv_idx // bs]
        return (block >= 0) & (block * bs + kv_idx % bs <= positions[b])

    # As wide as the pool (inductor's CPU kernel requires it), widened on the device; the q-side blocks are for
    # backward passes only: skipped where torch allows (2.9+).
    indices = F.pad(table, (0, blocks - table.shape[-1]))[:, None, None, :]
    extra = {"compute_q_blocks": False} if _SKIPS_Q_BLOCKS else {}
    return BlockMask.from_kv_blocks(counts, indices, BLOCK_SIZE=(128, bs), mask_mod=visible,
                                    seq_lengths=(1, blocks * bs), **extra)


def _skips_q_blocks() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask
    except ImportError:
        return False
    return "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters


_SKIPS_Q_BLOCKS = _skips_q_blocks()


FLEX_GRAPHS = 64  # compiled shapes of the flex kernel: one per bucket (and pool), beyond dynamo's default 8


def room_for_graphs(graphs: int) -> None:
    """Raise dynamo's per-code-object compile limit to `graphs` (never lower it): past the limit a fullgraph
    step fails instead of compiling its next bucket, and the flex kernel falls back to unfused attention."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    if getattr(config, name) < graphs:
        setattr(config, name, graphs)


@functools.cache
def flex_kernel(compiled: bool):
    """`flex_attention`, compiled where it runs for real (CUDA); eager elsewhere (tests on CPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    if compiled:
        room_for_graphs(FLEX_GRAPHS)
        return torch.compile(flex_attention, dynamic=False)
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    return flex_attention


