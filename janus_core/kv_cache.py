"""Static KV cache: per-layer key/value buffers allocated once and written in place.

Buffers are (L, R, H, S, D): layers, rows (one row per decoding sequence; a CFG image takes two),
KV heads, max sequence length, head dim. Every row keeps its own tokens from position 0, so rows
of different lengths share one batch without left padding: a decode step passes a per-row
position and a mask over the keys each row has.

transformers' Llama attention calls `past_key_values.update(k, v, layer_idx)`; `PrefillView` and
`DecodeView` answer that call by writing into the buffers and returning the keys/values to attend
over. `CachedPrefix` is a copy of a prompt prefix (system prompt + images) kept for reuse.
This module knows tensors and positions, not tokens, prompts or sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KVCache:
    def __init__(self, *, layers: int, rows: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (layers, rows, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, R, H, S, D)
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # (L, R, H, S, D)

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def copy_rows(self, src: list[int], dst: list[int], length: int) -> None:
        """Copy the first `length` positions of rows `src` into rows `dst` (e.g. one CFG pair to n images)."""
        src_t = torch.tensor(src, device=self.k.device)
        dst_t = torch.tensor(dst, device=self.k.device)
        self.k[:, dst_t, :, :length] = self.k[:, src_t, :, :length]
        self.v[:, dst_t, :, :length] = self.v[:, src_t, :, :length]

    def read(self, row: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of positions [0, length) of one row: two (L, H, T, D) tensors."""
        return self.k[:, row, :, :length].clone(), self.v[:, row, :, :length].clone()

    def write(self, row: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write (L, H, T, D) keys/values at positions [0, T) of one row."""
        length = k.shape[2]
        self.k[:, row, :, :length] = k
        self.v[:, row, :, :length] = v


class PrefillView:
    """Cache adapter for one prefill: rows `rows` get new tokens at positions [start, start + T).

    Attention runs over this prefill's rows only: the cached positions [0, start) of those rows
    (a reused prefix) followed by the new keys.
    """

    def __init__(self, cache: KVCache, rows: list[int], start: int) -> None:
        self.cache = cache
        self.rows = torch.tensor(rows, device=cache.k.device)  # (B,)
        self.start = start

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key, value: (B, H, T, D)
        end = self.start + key.shape[2]
        k_all, v_all = self.cache.k[layer_idx], self.cache.v[layer_idx]  # (R, H, S, D)
        k_all[self.rows, :, self.start:end] = key
        v_all[self.rows, :, self.start:end] = value
        if self.start == 0:
            return key, value
        return k_all[self.rows, :, :end], v_all[self.rows, :, :end]  # (B, H, start + T, D)


class DecodeView:
    """Cache adapter for one decode step over rows [0, B): row b writes its key at `positions[b]`.

    It returns views of the first `length` positions of those rows; the caller's mask hides the
    positions a row has not reached.
    """

    def __init__(self, cache: KVCache, positions: torch.Tensor, length: int) -> None:
        self.cache = cache
        self.positions = positions  # (B,) int64
        self.index = torch.arange(positions.shape[0], device=positions.device)  # (B,)
        self.length = length

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key, value: (B, H, 1, D)
        batch = key.shape[0]
        k_all, v_all = self.cache.k[layer_idx], self.cache.v[layer_idx]  # (R, H, S, D)
        k_all[self.index, :, self.positions] = key[:, :, 0]  # advanced indices first: (B, H, D)
        v_all[self.index, :, self.positions] = value[:, :, 0]
        return k_all[:batch, :, :self.length], v_all[:batch, :, :self.length]  # (B, H, length, D)


@dataclass
class CachedPrefix:
    k: torch.Tensor  # (L, H, T, D)
    v: torch.Tensor  # (L, H, T, D)

    @property
    def length(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

