"""Token selection: greedy, temperature and nucleus (top-p) sampling with per-request generators.

Each request (or each image of a request) owns a `torch.Generator`, so its draws do not depend on
what else shares the batch.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

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
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the tail of the distribution outside the top-p mass; always keeps the best token."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1.0 - top_p)
    drop_sorted[..., -1:] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next token for one row of logits (V,)."""
    if params.greedy:
        return int(torch.argmax(logits))
    scaled = top_p_filter(logits.float() / params.temperature, params.top_p)
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
