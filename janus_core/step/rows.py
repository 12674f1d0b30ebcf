"""The per-row state of one kind's decode step, in preallocated tensors on the model's device.

A decode step reads, for each sampling row (an understanding sequence, or one image of a generation
request): the token it feeds, its position, its sampling parameters, the uniforms of its random
stream and its step counter (and, for images, the CFG weight). These live in fixed-size tensors
that change only when the set of running sequences does: survivors are gathered to the front in
the new order with one index_select per tensor, joiners' rows written once from the host. Between
membership changes a step touches them only on the device: `advance` writes the chosen tokens in
and moves positions and counters on, so the next step's inputs exist before the host has seen the
tokens. The host keeps a mirror of the positions for the KV layout (slots, block runs).

This module knows rows, not requests: `RowValues` is what a batch module says about a joining one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from janus_core.sampling.sampler import RowSampling


@dataclass
class RowValues:
    """A joining sequence's rows (w of them), as host tensors."""

    last: torch.Tensor  # (w,) int64: the token each row feeds next
    position: int  # the position it is fed at (the same for every row of a sequence)
    step: int  # how many tokens each row has sampled: the index of its next uniform
    temperature: float
    top_p: float
    greedy: bool
    uniforms: torch.Tensor  # (w, T) float64, T <= horizon: the rows' streams from step 0
    cfg_weight: float = 0.0
    top_k: int = 0
    min_p: float = 0.0
    penalty: float = 1.0  # the repetition penalty; `history` holds the tokens it counts
    min_tokens: int = 0  # EOS is masked while `step` is below it
    history: torch.Tensor | None = None  # (T,) int64: the prompt and answer so far, when penalty != 1


class DecodeRows:
    def __init__(self, capacity: int, horizon: int, device: torch.device, *, vocab: int = 0, eos: int = -1) -> None:
        self.capacity, self.horizon, self.device = capacity, horizon, device
        self.vocab, self.eos = vocab, eos  # for the repetition penalty's token sets, and min_tokens' mask
        self.seqs: list = []
        self.widths: list[int] = []
        self.count = 0
        long = dict(dtype=torch.long, device=device)
        self.last = torch.zeros(capacity, **long)
        self.position = torch.zeros(capacity, **long)
        self.step = torch.zeros(capacity, **long)
        self.temperature = torch.ones(capacity, device=device)
        self.top_p = torch.ones(capacity, device=device)
        self.greedy = torch.ones(capacity, dtype=torch.bool, device=device)
        self.cfg_weight = torch.zeros(capacity, device=device)
        self.uniforms = torch.full((capacity, horizon), 0.5, dtype=torch.float64, device=device)
        self.top_k = torch.zeros(capacity, **long)
        self.min_p = torch.zeros(capacity, device=device)
        self.penalty = torch.ones(capacity, device=device)
        self.min_tokens = torch.zeros(capacity, **long)
        self.seen: torch.Tensor | None = None  # (capacity, vocab) bool, made when a penalty row first joins
        # Host mirrors: positions for the KV layout, and which rows sort (top-p) or sample at all.
        self.host_position = np.zeros(capacity, dtype=np.int64)
        self.host_top_p = np.ones(capacity, dtype=np.float32)
        self.host_greedy = np.ones(capacity, dtype=bool)
        self.host_top_k = np.zeros(capacity, dtype=np.int64)
        self.host_min_p = np.zeros(capacity, dtype=np.float32)
        self.host_penalty = np.ones(capacity, dtype=np.float32)
        self.host_min_tokens = np.zeros(capacity, dtype=np.int64)
        self._top_p_rows: torch.Tensor | None = None
        self._top_k_rows: torch.Tensor | None = None
        self._min_p_rows: torch.Tensor | None = None
        self._penalty_rows: torch.Tensor | None = None
        self._any_min_tokens = False
        self._all_greedy = True
        self._any_greedy = True

    def _tensors(self) -> list[torch.Tensor]:
        tensors = [self.last, self.position, self.step, self.temperature, self.top_p, self.greedy, self.cfg_weight,
                   self.uniforms, self.top_k, self.min_p, self.penalty, self.min_tokens]
        return tensors if self.seen is None else [*tensors, self.seen]

    def _mirrors(self) -> list[np.ndarray]:
        return [self.host_position, self.host_top_p, self.host_greedy, self.host_top_k, self.host_min_p,
                self.host_penalty, self.host_min_tokens]

    def sync(self, seqs: list, width, values) -> bool:
        """Make the rows those of `seqs` in that order (`width(seq)` rows each); `values(seq)` gives a
        joining sequence's `RowValues`. Returns whether anything changed."""
        if seqs == self.seqs:
            return False
        old: dict = {}
        at = 0
        for seq, w in zip(self.seqs, self.widths, strict=True):
            old[seq] = at
            at += w
        widths = [width(seq) for seq in seqs]
        total = sum(widths)
        if total > self.capacity:
            raise ValueError(f"{total} decode rows exceed the engine's {self.capacity}")
        source, joined, at = [], [], 0
        for seq, w in zip(seqs, widths, strict=True):
            if seq in old:
                source += range(old[seq], old[seq] + w)
            else:
                joined.append((at, seq))
                source += [0] * w
            at += w
        if total and any(i != j for i, j in enumerate(source)):
            index = torch.tensor(source, device=self.device)
            for t in self._tensors():
                t[:total] = t.index_select(0, index)
            for mirror in self._mirrors():
                mirror[:total] = mirror[source]
        for at, seq in joined:
            self._write(at, values(seq))
        self.seqs, self.widths, self.count = list(seqs), widths, total
        sampled = ~self.host_greedy[:total]
        self._top_p_rows = self._which((self.host_top_p[:total] < 1.0) & sampled)
        self._top_k_rows = self._which((self.host_top_k[:total] > 0) & sampled)
        self._min_p_rows = self._which((self.host_min_p[:total] > 0.0) & sampled)
        self._penalty_rows = self._which(self.host_penalty[:total] != 1.0)
        self._any_min_tokens = bool((self.host_min_tokens[:total] > 0).any())
        self._all_greedy = bool(self.host_greedy[:total].all())
        self._any_greedy = bool(self.host_greedy[:total].any())
        return True

    def _which(self, mask: np.ndarray) -> torch.Tensor | None:
        rows = np.flatnonzero(mask)
        return torch.from_numpy(rows).to(self.device) if len(rows) else None

    def reset(self) -> None:
        """Forget which sequences the rows hold (after a failed step): the next `sync` writes every row afresh."""
        self.seqs, self.widths, self.count = [], [], 0

    def _write(self, at: int, v: RowValues) -> None:
        w = len(v.last)
        rows = slice(at, at + w)
        self.last[rows] = v.last.to(self.device)
        self.position[rows] = v.position
        self.step[rows] = v.step
        self.temperature[rows] = 1.0 if v.greedy else v.temperature
        self.top_p[rows] = v.top_p
        self.greedy[rows] = v.greedy
        self.cfg_weight[rows] = v.cfg_weight
        span = min(v.uniforms.shape[1], self.horizon)
        self.uniforms[rows, :span] = v.uniforms[:, :span].to(self.device)
        self.top_k[rows], self.min_p[rows], self.penalty[rows], self.min_tokens[rows] = (
            v.top_k, v.min_p, v.penalty, v.min_tokens)
        self.host_position[rows], self.host_top_p[rows], self.host_greedy[rows] = v.position, v.top_p, v.greedy
        self.host_top_k[rows], self.host_min_p[rows] = v.top_k, v.min_p
        self.host_penalty[rows], self.host_min_tokens[rows] = v.penalty, v.min_tokens
        if v.penalty != 1.0:
            if v.history is None or self.vocab <= 0:
                raise ValueError("a repetition penalty row needs its token history and the rows' vocab size")
            if self.seen is None:
                self.seen = torch.zeros(self.capacity, self.vocab, dtype=torch.bool, device=self.device)
            self.seen[rows] = False
            self.seen[rows, v.history.to(self.device)] = True

    def sampling(self) -> RowSampling:
        """This step's sampling view of the rows: each row's uniform at its own step counter."""
        n = self.count
        step = self.step[:n].clamp(max=self.horizon - 1)[:, None]
        rows, k_rows, min_p_rows, penalty_rows = (self._top_p_rows, self._top_k_rows, self._min_p_rows,
                                                   self._penalty_rows)
        return RowSampling(
            temperature=self.temperature[:n], greedy=self.greedy[:n], uniform=self.uniforms[:n].gather(1, step)[:, 0],
            top_p_rows=rows, top_p=None if rows is None else self.top_p[rows], all_greedy=self._all_greedy,
            any_greedy=self._any_greedy, top_k_rows=k_rows, top_k=None if k_rows is None else self.top_k[k_rows],
            top_k_max=int(self.host_top_k[:n].max(initial=0)), min_p_rows=min_p_rows,
            min_p=None if min_p_rows is None else self.min_p[min_p_rows], penalty_rows=penalty_rows,
            penalty=None if penalty_rows is None else self.penalty[penalty_rows],
            seen=None if penalty_rows is None or self.seen is None else self.seen[penalty_rows],
            ban_eos=self.step[:n] < self.min_tokens[:n] if self._any_min_tokens and self.eos >= 0 else None,
            eos=self.eos)

    def advance(self, chosen: torch.Tensor) -> None:
        """After a step: every row feeds the token it chose, one position and one step further on."""
        n = self.count
        self.last[:n] = chosen
        self.position[:n] += 1
        self.step[:n] += 1
        self.host_position[:n] += 1
        if self._penalty_rows is not None and self.seen is not None:
            self.seen[self._penalty_rows, chosen[self._penalty_rows]] = True
