"""Token selection for a whole batch at once: greedy, temperature and nucleus (top-p) sampling.

Every row draws with one uniform per step from a counter-based stream (`janus_core.philox`): an
understanding request's stream is keyed by its seed, image i of a generation request by seed + i,
and step t takes the stream's t-th number. The draws therefore depend on (seed, image, step) only:
not on the batch, its order or its size, nor on a preemption in between. No generator object per
row, no per-row kernels or host syncs: `sample` is a handful of batched ops over (rows, vocab).

Seeded outputs changed once, when this scheme replaced one `torch.Generator` per row; the streams
are fixed from here on (a test pins the first uniforms of a seed and a seeded request's tokens).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np
import torch

from janus_core import philox
from janus_core.errors import InvalidRequestError

MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0) or self.temperature > 100:
            raise InvalidRequestError(f"temperature must be between 0 and 100, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise InvalidRequestError(f"seed must be between 0 and 2^63-1, got {self.seed}")

    @property
    def greedy(self) -> bool:
        # Below MIN_TEMPERATURE, logits / temperature overflows; the limit of sampling there is argmax anyway.
        return self.temperature < MIN_TEMPERATURE


def new_seed() -> int:
    return secrets.randbits(62)


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A generator for draws made once per request (e.g. a flow model's initial noise), not per step."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def top_p_filter(logits: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) the tail outside the top-p mass of each row; always keeps each row's best token.

    The kept set is transformers' `TopPLogitsWarper`'s: sorted ascending, a token is dropped while the
    mass up to and including it is at most 1 - top_p. `top_p` is a number, or one value per row of a
    (R, V) `logits` as an (R,) tensor.
    """
    if not isinstance(top_p, torch.Tensor):
        if top_p >= 1.0:
            return logits
        top_p = torch.tensor(top_p, device=logits.device)
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    threshold = (1.0 - top_p.to(cumulative.dtype)).reshape(*top_p.shape, *[1] * (logits.dim() - top_p.dim()))
    drop_sorted = cumulative <= threshold
    drop_sorted[..., -1:] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def stream_uniforms(seed: int, count: int, start: int = 0) -> torch.Tensor:
    """The uniforms of steps [start, start + count) of the stream `seed`: (count,) float64 on CPU."""
    return torch.from_numpy(philox.uniforms(seed, np.arange(start, start + count, dtype=np.uint64)))


@dataclass
class RowSampling:
    """Sampling parameters of R rows as tensors on the logits' device (a view of the engine's row state).

    `uniform[r]` is row r's draw for this step; `top_p_rows` lists the rows with top_p < 1 (None: none),
    `top_p` their values; `all_greedy` lets a step of greedy rows skip everything but the argmax, and
    without `any_greedy` no argmax is taken at all.
    """

    temperature: torch.Tensor  # (R,) float32; 1.0 on greedy rows
    greedy: torch.Tensor  # (R,) bool
    uniform: torch.Tensor  # (R,) float64 in (0, 1)
    top_p_rows: torch.Tensor | None = None  # (K,) int64
    top_p: torch.Tensor | None = None  # (K,) float32
    all_greedy: bool = False
    any_greedy: bool = True

    @classmethod
    def of(cls, params: list[SamplingParams], uniform: torch.Tensor, device: torch.device) -> RowSampling:
        """From per-row parameters (built on the host: for prefill, and for tests)."""
        rows = [i for i, p in enumerate(params) if not p.greedy and p.top_p < 1.0]
        return cls(
            temperature=torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=device),
            greedy=torch.tensor([p.greedy for p in params], device=device),
            uniform=uniform.to(device),
            top_p_rows=torch.tensor(rows, device=device) if rows else None,
            top_p=torch.tensor([params[i].top_p for i in rows], device=device) if rows else None,
            all_greedy=all(p.greedy for p in params), any_greedy=any(p.greedy for p in params))


def sample(logits: torch.Tensor, rows: RowSampling) -> torch.Tensor:
    """One token per row of `logits` (R, V) float32, all rows in one pass; returns (R,) int64 on the device.

    Greedy rows: the exact argmax. Sampled rows: logits / temperature, top-p where asked (one sort over
    those rows), softmax, then inverse-CDF sampling: the first token whose cumulative probability
    (float64) exceeds the row's uniform times the total. One uniform per row and step, from the
    counter-based stream of its seed, makes a row's draw independent of the batch; zero-probability
    tokens are never chosen (their CDF step is empty).
    """
    if rows.all_greedy:
        return torch.argmax(logits, dim=-1)
    scaled = logits / rows.temperature[:, None]
    if rows.top_p_rows is not None:
        scaled = scaled.index_copy(0, rows.top_p_rows, top_p_filter(scaled[rows.top_p_rows], rows.top_p))
    cdf = torch.softmax(scaled, dim=-1).double().cumsum_(dim=-1)  # (R, V)
    target = (rows.uniform * cdf[:, -1])[:, None]
    drawn = torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=logits.shape[-1] - 1)
    return torch.where(rows.greedy, torch.argmax(logits, dim=-1), drawn) if rows.any_greedy else drawn
