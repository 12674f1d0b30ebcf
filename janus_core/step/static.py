"""The decode step as one function of fixed-shape tensors: what `torch.compile` (and CUDA graphs) need.

`StaticDecode.step(ids, positions, slots, block_counts, block_indices, to_logical)` runs the LM's
layers over P rows (P a power-of-two bucket) with flex attention over the paged pool and returns
the head's logits (P, V). Everything that varies from step to step (tokens, positions, where the
keys go, which blocks each row reads) is a tensor argument of a shape fixed per bucket, and the
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

from janus_core.attention.paged import PagedKV, _write, block_mask


def tables_to_tensors(kv: PagedKV, tables: Sequence[Sequence[int]], positions: Sequence[int], padded: int,
                      scratch_slot: int) -> dict[str, torch.Tensor]:
    """The step's arguments for rows with block tables `tables` feeding one token at `positions`
    (a row's blocks are distinct, as the pool hands them out). Built with numpy, a slice per row."""
    bs, blocks = kv.block_size, kv.num_blocks
    rows = len(tables)
    pos = np.asarray(positions, dtype=np.int64)
    used = pos // bs + 1  # blocks each row reads, its new token's included
    width = int(used.max()) if rows else 1
    table = np.zeros((rows, width), dtype=np.int64)
    for r, t in enumerate(tables):
        table[r, :used[r]] = t[:used[r]]
    valid = np.arange(width)[None, :] < used[:, None]  # (rows, width)
    counts = np.zeros((padded, 1, 1), dtype=np.int32)  # padding rows read no block
    counts[:rows, 0, 0] = used
    indices = np.zeros((padded, 1, 1, blocks), dtype=np.int32)
    indices[:rows, 0, 0, :width] = np.where(valid, table, 0)
    to_logical = np.full((padded, blocks), -1, dtype=np.int32)
    r, k = np.nonzero(valid)
    to_logical[r, table[r, k]] = k
    slots = np.full(padded, scratch_slot, dtype=np.int64)
    slots[:rows] = table[np.arange(rows), pos // bs] * bs + pos % bs
    positions_t = np.full(padded, -1, dtype=np.int64)
    positions_t[:rows] = pos
    device = kv.device
    return {"positions": torch.from_numpy(positions_t).to(device), "slots": torch.from_numpy(slots).to(device),
            "block_counts": torch.from_numpy(counts).to(device), "block_indices": torch.from_numpy(indices).to(device),
            "to_logical": torch.from_numpy(to_logical).to(device)}


class _Attention:
    """The `janus_kv` object the layers see inside the step: write this step's keys, attend with flex."""

    def __init__(self, kv: PagedKV, slots: torch.Tensor, mask) -> None:
        self.kv, self.slots, self.mask = kv, slots, mask

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        from torch.nn.attention.flex_attention import flex_attention

        _write(self.kv, layer, self.slots, k, v)
        return flex_attention(q, self.kv.k[layer][None], self.kv.v[layer][None], block_mask=self.mask, scale=scale)


class StaticDecode:
    def __init__(self, runner, kv: PagedKV, head: str) -> None:
        self.runner, self.kv = runner, kv
        model = runner.model
        self.embed = model.get_input_embeddings() if head == "text" else model.prepare_embeddings_for_image_generation
        self.head = runner.model.lm_head if head == "text" else runner.model.model.generation_head

    def step(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, block_counts: torch.Tensor,
             block_indices: torch.Tensor, to_logical: torch.Tensor) -> torch.Tensor:
        # ids, positions, slots: (P,); block_counts (P, 1, 1), block_indices (P, 1, 1, NB), to_logical (P, NB)
        mask = block_mask(self.kv, block_counts, block_indices, to_logical, positions)
        embeds = self.embed(ids[:, None])  # (P, 1, D)
        hidden = self.runner.layers(embeds, positions.clamp(min=0)[:, None], _Attention(self.kv, slots, mask))
        return self.head(hidden[:, -1, :]).float()  # (P, V)
