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

import torch

from janus_core.kv_cache import PagedKV, _write


def bucket(rows: int) -> int:
    return 1 << max(rows - 1, 0).bit_length()


def tables_to_tensors(kv: PagedKV, tables: Sequence[Sequence[int]], positions: Sequence[int], padded: int,
                      scratch_slot: int) -> dict[str, torch.Tensor]:
    """The step's arguments for rows with block tables `tables` feeding one token at `positions`."""
    bs, blocks, device = kv.block_size, kv.num_blocks, kv.device
    rows = len(tables)
    slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, positions, strict=True)]
    slots += [scratch_slot] * (padded - rows)
    counts = torch.zeros((padded, 1, 1), dtype=torch.int32)
    indices = torch.zeros((padded, 1, 1, blocks), dtype=torch.int32)
    to_logical = torch.full((padded, blocks), -1, dtype=torch.int32)
    for r, (table, p) in enumerate(zip(tables, positions, strict=True)):
        used = list(table[:p // bs + 1])
        distinct = list(dict.fromkeys(used))  # a block shared by two logical indices is visited once
        counts[r, 0, 0] = len(distinct)
        indices[r, 0, 0, :len(distinct)] = torch.tensor(distinct, dtype=torch.int32)
        for logical, block in enumerate(used):
            if to_logical[r, block] < 0:
                to_logical[r, block] = logical
    return {"positions": torch.tensor([*positions, *[-1] * (padded - rows)], device=device),
            "slots": torch.tensor(slots, device=device), "block_counts": counts.to(device),
            "block_indices": indices.to(device), "to_logical": to_logical.to(device)}


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
        from torch.nn.attention.flex_attention import BlockMask  # torch >= 2.5; imported where it is used

        bs = self.kv.block_size

        def visible(b, h, q_idx, kv_idx):
            logical = to_logical[b, kv_idx // bs]
            return (logical >= 0) & (logical * bs + kv_idx % bs <= positions[b])

        mask = BlockMask.from_kv_blocks(block_counts, block_indices, BLOCK_SIZE=(128, bs), mask_mod=visible,
                                        seq_lengths=(1, self.kv.num_slots))
        core = self.runner.core
        embeds = self.embed(ids[:, None])  # (P, 1, D)
        cos_sin = core.rotary_emb(embeds, position_ids=positions.clamp(min=0)[:, None])
        batch = _Attention(self.kv, slots, mask)
        hidden = embeds
        for layer in core.layers:
            hidden = layer(hidden, attention_mask=None, position_embeddings=cos_sin, janus_kv=batch)
        return self.head(core.norm(hidden)[:, -1, :]).float()  # (P, V)
