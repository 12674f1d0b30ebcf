"""The paged KV cache: one pool of block-sized slots per layer, written and attended in place.

`PagedKV` holds keys and values per layer as (H, S, D): KV heads, slots (num_blocks x block_size),
head dim. Position p of a row lives in slot `table[p // bs] * bs + p % bs` of its block table
(`janus_core.sched.block_pool` decides which blocks). The layout keeps a run of consecutive slots a
strided (H, T, D) view, so a row whose blocks are consecutive is attended without a copy.

transformers' Llama layers look up their attention function by name; `janus_paged` (registered
here) writes the new keys/values into their slots and attends over the row's slots, given a
`PrefillBatch` or `DecodeBatch` through the layer's keyword arguments. Without one it is plain SDPA,
so the same model still runs transformers' own paths (and its `generate`, the oracle).

Decode attention has two implementations over the same pool, chosen per `PagedKV.attention`:
- "runs" (CPU): per row, SDPA over each run of consecutive slots read in place (one call when the
  row's blocks are consecutive, an exact softmax over the runs' scores when not). Exact in fp32.
- "flex" (CUDA): one `flex_attention` call for the whole batch over the whole pool, with a
  `BlockMask` built from the block tables, so the kernel visits each row's blocks where they lie
  (torch itself, no extra dependency; compiled, with the batch padded to power-of-two buckets so a
  handful of compilations serve every request mix): `janus_core.attention.flex`.

This module knows tensors, slots and positions; not tokens, prompts, blocks' owners or sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from janus_core.attention.flex import FlexBlocks

ATTENTION = "janus_paged"

Run = tuple[int, int]  # slots [start, end) holding consecutive positions of one row


class PagedKV:
    def __init__(self, *, layers: int, kv_heads: int, num_blocks: int, block_size: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (kv_heads, num_blocks * block_size, head_dim)
        # One allocation per layer, not views into one (L, ...) tensor: a view at a storage offset is
        # misread by inductor's CPU flex-attention kernel (torch 2.13), and nothing needs them contiguous.
        # Zeros, not garbage: a NaN in a slot nobody wrote must never reach a masked product.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]  # L x (H, S, D)
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]  # L x (H, S, D)
        self.block_size = block_size
        self.num_slots = num_blocks * block_size
        self.device = torch.device(device)
        self.attention = "flex" if self.device.type == "cuda" else "runs"

    @property
    def num_blocks(self) -> int:
        return self.num_slots // self.block_size

    @property
    def nbytes(self) -> int:
        return 2 * sum(t.numel() * t.element_size() for t in self.k)

    def copy_slots(self, src: Sequence[int], dst: Sequence[int]) -> None:
        """Copy the keys/values of slots `src` into slots `dst` in every layer (a request's partial prompt block)."""
        src_t = torch.tensor(list(src), device=self.device)
        dst_t = torch.tensor(list(dst), device=self.device)
        for buf in (*self.k, *self.v):
            buf[:, dst_t] = buf[:, src_t]


def slots_of(table: Sequence[int], block_size: int, start: int, end: int) -> list[int]:
    """Slots of positions [start, end) of a row with block table `table`."""
    return [table[p // block_size] * block_size + p % block_size for p in range(start, end)]


def runs_of(table: Sequence[int], block_size: int, length: int) -> list[Run]:
    """Positions [0, length) of a row as runs of consecutive slots (one run when its blocks are consecutive)."""
    runs: list[Run] = []
    for b in range((length + block_size - 1) // block_size):
        start = table[b] * block_size
        end = start + min(block_size, length - b * block_size)
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((start, end))
    return runs


def row_tables(rows: int, length: int, block_size: int) -> list[list[int]]:
    """Consecutive blocks for `rows` rows of `length` positions (row r: blocks [r*n, (r+1)*n)); for benchmarks."""
    n = -(-length // block_size)
    return [list(range(r * n, (r + 1) * n)) for r in range(rows)]


@dataclass
class PrefillBatch:
    """B rows that each get T new tokens at positions [start, start + T)."""

    kv: PagedKV
    slots: torch.Tensor  # (B, T) int64: where the new tokens' keys/values go
    prefix: torch.Tensor | None = None  # (B, start) int64: slots of the positions already cached

    @classmethod
    def for_rows(cls, kv: PagedKV, tables: Sequence[Sequence[int]], start: int, end: int) -> PrefillBatch:
        """Rows with block tables `tables` computing positions [start, end) over their cached [0, start)."""
        def slots(a: int, b: int) -> torch.Tensor:
            return torch.tensor([slots_of(t, kv.block_size, a, b) for t in tables], device=kv.device)

        return cls(kv, slots(start, end), slots(0, start) if start else None)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        # q, k, v: (B, H, T, D) -> (B, H, T, D)
        _write(self.kv, layer, self.slots.reshape(-1), k, v)
        if self.prefix is None:  # from position 0: SDPA's own causal mask, as the reference computes it
            return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=scale)
        start, length = self.prefix.shape[1], q.shape[2]
        pk, pv = (_gather(buf[layer], self.prefix) for buf in (self.kv.k, self.kv.v))  # (B, H, start, D)
        keys, values = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        query_pos = start + torch.arange(length, device=q.device)
        mask = torch.arange(start + length, device=q.device)[None, :] <= query_pos[:, None]  # (T, start + T)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)


@dataclass(frozen=True)
class RowPart:
    """Run j of every row of a group: starts evenly spaced (`step` 0: the same run, e.g. a shared prompt)."""

    start: int  # the first row's first slot of this run
    step: int
    length: int  # the longest row's run; shorter ones are masked
    mask: torch.Tensor | None  # (G, 1, 1, length) bool, None when every row's run is `length` long


@dataclass(frozen=True)
class RowGroup:
    """Decode rows [lo, hi) with the same number of runs, each run at evenly spaced slots across the rows:
    one strided view of the pool per run holds them all."""

    lo: int
    hi: int
    parts: list[RowPart]


@dataclass
class DecodeBatch:
    """B rows that each get one new token; row b attends over the slot runs `runs[b]` (its new token's included)."""

    kv: PagedKV
    slots: torch.Tensor  # (B,) int64
    runs: list[list[Run]]
    flex: FlexBlocks | None = None
    groups: list[RowGroup] = field(default_factory=list)

    @classmethod
    def for_rows(cls, kv: PagedKV, tables: Sequence[Sequence[int]], positions: Sequence[int]) -> DecodeBatch:
        """Row b (block table `tables[b]`) feeds one token at `positions[b]`."""
        bs = kv.block_size
        slots = torch.tensor([t[p // bs] * bs + p % bs for t, p in zip(tables, positions, strict=True)],
                             device=kv.device)
        if kv.attention == "flex":
            return cls(kv, slots, [], FlexBlocks(kv, tables, positions))
        runs = [runs_of(t, bs, p + 1) for t, p in zip(tables, positions, strict=True)]
        return cls(kv, slots, runs, groups=row_groups(runs, kv.num_slots, kv.device))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        # q, k, v: (B, H, 1, D) -> (B, H, 1, D)
        _write(self.kv, layer, self.slots, k, v)
        if self.flex is not None:
            return self.flex.attend(layer, q, scale)
        k_all, v_all = self.kv.k[layer], self.kv.v[layer]  # (H, S, D)
        out = []
        for g in self.groups:
            # Rows at evenly spaced slots (images admitted together; answers with room to grow after a
            # shared system prompt) are read through strided views of the pool: one call per run for all of
            # them instead of one per row (each call starts OpenMP's team).
            views = [(_strided(k_all, g, p), _strided(v_all, g, p), p.mask) for p in g.parts]
            if len(views) == 1:
                keys, values, mask = views[0]
                out.append(F.scaled_dot_product_attention(q[g.lo:g.hi], keys, values, attn_mask=mask, scale=scale))
            elif q.device.type == "cpu":
                out.append(_merge_parts(q[g.lo:g.hi], views, scale))
            else:
                out += [_attend_runs(q[b], k_all, v_all, self.runs[b], scale)[None] for b in range(g.lo, g.hi)]
        return torch.cat(out)


def _strided(buf: torch.Tensor, group: RowGroup, part: RowPart) -> torch.Tensor:
    """(G, H, length, D) view of `buf` (H, S, D): row i of the group starts at slot start + i * step."""
    heads, dim = buf.shape[0], buf.shape[2]
    return buf.as_strided((group.hi - group.lo, heads, part.length, dim), (part.step * dim, *buf.stride()),
                          buf.storage_offset() + part.start * dim)


def _merge_parts(q: torch.Tensor, views: list, scale: float) -> torch.Tensor:
    """Attention over several runs per row from each run's attention and log-sum-exp: the exact softmax."""
    outs, lses = [], []
    for keys, values, mask in views:
        additive = None
        if mask is not None:
            additive = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, keys, values, attn_mask=additive,
                                                                             scale=scale)
        outs.append(o.float())
        lses.append(lse.float())  # (G, H, 1)
    total = torch.logsumexp(torch.stack(lses), dim=0)
    merged = sum(o * torch.exp(lse - total)[..., None] for o, lse in zip(outs, lses, strict=True))
    return merged.to(q.dtype)


def row_groups(runs: list[list[Run]], num_slots: int, device: torch.device) -> list[RowGroup]:
    """Consecutive rows with as many runs each and every run evenly spaced across them form a group (their
    views must fit the pool); every other row is a group of its own."""
    if all(len(row) == 1 for row in runs):
        return _single_run_groups([row[0] for row in runs], num_slots, device)
    return _general_groups(runs, num_slots, device)


def _general_groups(runs: list[list[Run]], num_slots: int, device: torch.device) -> list[RowGroup]:
    bounds: list[list] = []  # [lo, hi, steps, longest run j so far] per group
    for b, row in enumerate(runs):
        lengths = [end - start for start, end in row]
        if bounds and bounds[-1][1] == b and len(row) == len(runs[b - 1]):
            lo, hi, steps, longest = bounds[-1]
            gaps = [r[0] - p[0] for r, p in zip(row, runs[b - 1], strict=True)]
            longer = [max(a, c) for a, c in zip(longest, lengths, strict=True)]
            fits = all(runs[lo][j][0] + (b - lo) * gaps[j] + longer[j] <= num_slots for j in range(len(row)))
            if min(gaps) >= 0 and max(gaps) > 0 and (hi - lo == 1 or gaps == steps) and fits:
                bounds[-1] = [lo, b + 1, gaps, longer]
                continue
        bounds.append([b, b + 1, [0] * len(row), lengths])
    groups = []
    for lo, hi, steps, _ in bounds:
        parts = []
        for j, step in enumerate(steps):
            lengths = [r[j][1] - r[j][0] for r in runs[lo:hi]]
            longest, mask = max(lengths), None
            if min(lengths) != longest:
                visible = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]  # (G, L)
                mask = visible[:, None, None, :].to(device)
            parts.append(RowPart(runs[lo][j][0], step, longest, mask))
        groups.append(RowGroup(lo, hi, parts))
    return groups


def _single_run_groups(runs: list[Run], num_slots: int, device: torch.device) -> list[RowGroup]:
    """`row_groups` when every row is one run (consecutive blocks): the same grouping, in scalar arithmetic."""
    groups: list[RowGroup] = []
    lo, step, longest = 0, 0, runs[0][1] - runs[0][0]
    for b in range(1, len(runs) + 1):
        if b < len(runs):
            start, end = runs[b]
            gap = start - runs[b - 1][0]
            longer = max(longest, end - start)
            if gap > 0 and (b - lo == 1 or gap == step) and runs[lo][0] + (b - lo) * gap + longer <= num_slots:
                step, longest = gap, longer
                continue
        lengths = [end - start for start, end in runs[lo:b]]
        mask = None
        if min(lengths) != longest:
            visible = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]  # (G, L)
            mask = visible[:, None, None, :].to(device)
        groups.append(RowGroup(lo, b, [RowPart(runs[lo][0], step if b - lo > 1 else 0, longest, mask)]))
        if b < len(runs):
            lo, step, longest = b, 0, runs[b][1] - runs[b][0]
    return groups


def _write(kv: PagedKV, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    # k, v: (B, H, T, D) -> slots (B*T,) of (H, S, D)
    heads = k.shape[1]
    kv.k[layer][:, slots] = k.transpose(0, 1).reshape(heads, -1, k.shape[-1])
    kv.v[layer][:, slots] = v.transpose(0, 1).reshape(heads, -1, v.shape[-1])


def _gather(buf: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    # buf (H, S, D), slots (B, T) -> (B, H, T, D)
    batch, length = slots.shape
    return buf[:, slots.reshape(-1)].reshape(buf.shape[0], batch, length, -1).transpose(0, 1)


def _attend_runs(q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, runs: list[Run],
                 scale: float) -> torch.Tensor:
    """One row's attention (q: (H, 1, D)) over its runs of slots, reading each run in place."""
    if len(runs) == 1:
        start, end = runs[0]
        return F.scaled_dot_product_attention(q[None], k_all[None, :, start:end], v_all[None, :, start:end],
                                              scale=scale)[0]
    # Several runs: an exact softmax over the scores of all runs, then the runs' weighted values summed.
    scores = torch.cat([q.float() @ k_all[:, a:b].float().transpose(1, 2) for a, b in runs], dim=-1) * scale
    probs = scores.softmax(dim=-1)  # (H, 1, T)
    out, at = None, 0
    for a, b in runs:
        part = probs[..., at:at + b - a].to(v_all.dtype) @ v_all[:, a:b]  # (H, 1, D)
        out = part if out is None else out + part
        at += b - a
    assert out is not None
    return out


def paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs):
    """transformers' attention-function signature; `janus_kv` in kwargs selects the paged path."""
    batch = kwargs.pop("janus_kv", None)
    if batch is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # the pool stores KV heads; the products need one per query head
        raise NotImplementedError("grouped-query attention is not supported by the paged KV cache")
    out = batch.attend(module.layer_idx, query, key, value, scaling or query.shape[-1] ** -0.5)  # (B, H, T, D)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, paged_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)
