"""The decode step as one function of fixed-shape tensors: what `torch.compile` and CUDA graphs
(`janus_core.step.graphs`) need.

`StaticDecode.step(ids, positions, slots, block_counts, table)` runs the LM's layers over P rows (P a
power-of-two bucket) with flex attention over the paged pool and returns the head's logits (P, V).
Everything that varies from step to step (tokens, positions, where the keys go, which blocks each row
reads) is a tensor argument of a shape fixed per bucket (and block-table width), and the
mask function is built inside the step from those tensors, so a compiled step is traced once per
bucket and never again as positions move. Rows past the batch are padding: they read nothing
visible and write their keys into one scratch slot the caller keeps out of the pool.

`tables_to_tensors` turns the host's block tables and positions into those arguments (the eager
`FlexBlocks` builds the same mask from the same description).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from janus_core.attention.flex import block_mask, compact_tables
from janus_core.attention.paged import PagedKV, _write


def tables_to_tensors(kv: PagedKV, tables: Sequence[Sequence[int]], positions: Sequence[int], padded: int,
                      scratch_slot: int, width: int = 1) -> dict[str, torch.Tensor]:
    """The step's arguments for rows with block tables `tables` feeding one token at `positions` (a row's
    blocks are distinct, as the pool hands them out). `width`: the block table's columns, fixed per caller
    so a compiled or captured step keeps its shapes (widened if a row needs more). Built with numpy; what
    crosses to the device is O(rows x width), the step expands it there (`expand_tables`)."""
    bs = kv.block_size
    rows = len(tables)
    pos = np.asarray(positions, dtype=np.int64)
    table, used = compact_tables(tables, positions, bs, padded, width)
    counts = np.zeros((padded, 1, 1), dtype=np.int32)  # padding rows read no block
    counts[:rows, 0, 0] = used
    slots = np.full(padded, scratch_slot, dtype=np.int64)
    slots[:rows] = table[np.arange(rows), pos // bs].astype(np.int64) * bs + pos % bs
    positions_t = np.full(padded, -1, dtype=np.int64)
    positions_t[:rows] = pos
    device = kv.device
    return {"positions": torch.from_numpy(positions_t).to(device), "slots": torch.from_numpy(slots).to(device),
            "block_counts": torch.from_numpy(counts).to(device), "table": torch.from_numpy(table).to(device)}


class _Attention:
    """The `janus_kv` object the layers see inside the step: write this step's keys, attend with flex."""

    def __init__(self, kv: PagedKV, slots: torch.Tensor, mask, flex) -> None:
        self.kv, self.slots, self.mask, self.flex = kv, slots, mask, flex

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        _write(self.kv, layer, self.slots, k, v)
        return self.flex(q, self.kv.k[layer][None], self.kv.v[layer][None], block_mask=self.mask, scale=scale)


class StaticDecode:
    """`flex`: the attention kernel; by default plain `flex_attention`, for a step compiled whole. An eager step
    (captured as a CUDA graph without compiling it) passes a compiled `flex_attention` of its own."""

    def __init__(self, runner, kv: PagedKV, head: str, flex=None) -> None:
        from torch.nn.attention.flex_attention import flex_attention

        self.runner, self.kv, self.flex = runner, kv, flex or flex_attention
        model = runner.model
        self.embed = model.get_input_embeddings() if head == "text" else model.prepare_embeddings_for_image_generation
        self.head = runner.model.lm_head if head == "text" else runner.model.model.generation_head

    def step(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, block_counts: torch.Tensor,
             table: torch.Tensor) -> torch.Tensor:
        # ids, positions, slots: (P,); block_counts (P, 1, 1); table (P, W): each row's blocks, the first counts used
        mask = block_mask(self.kv, block_counts, table, positions)
        embeds = self.embed(ids[:, None])  # (P, 1, D)
        attention = _Attention(self.kv, slots, mask, self.flex)
        hidden = self.runner.layers(embeds, positions.clamp(min=0)[:, None], attention)
        return self.head(hidden[:, -1, :]).float()  # (P, V)
