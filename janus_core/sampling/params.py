"""Sampling parameters and seeds: what a request asks of the sampler, in plain Python (no torch).

The seed rule lives here once: a request without a seed gets a fresh one, except greedy understanding,
which draws nothing (its result reports no seed); image i of a generation request draws from the
stream of seed + i.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from janus_core.errors import InvalidRequestError

MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How a row picks its tokens. The filters apply in transformers' order: repetition penalty on the raw
    logits (every prompt and answer token, as transformers and vLLM count them), temperature, top-k, top-p,
    min-p. `min_tokens` masks EOS until that many tokens are out; `ignore_eos` lets EOS pass as a token.
    Only temperature and top_p mean anything to image tokens."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off; else drop tokens below min_p times the most likely one's probability
    repetition_penalty: float = 1.0  # 1: off; > 1 discourages tokens already in the prompt or answer
    min_tokens: int = 0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0) or self.temperature > 100:
            raise InvalidRequestError(f"temperature must be between 0 and 100, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise InvalidRequestError(f"seed must be between 0 and 2^63-1, got {self.seed}")
        if not (0 <= self.top_k < 2**31):
            raise InvalidRequestError(f"top_k must be 0 (off) or a positive number of tokens, got {self.top_k}")
        if not (0.0 <= self.min_p <= 1.0):
            raise InvalidRequestError(f"min_p must be between 0 and 1, got {self.min_p}")
        if not (0.01 <= self.repetition_penalty <= 100.0):  # far below 1, logits / penalty overflows
            raise InvalidRequestError(f"repetition_penalty must be between 0.01 and 100, got {self.repetition_penalty}")
        if not (0 <= self.min_tokens < 2**31):
            raise InvalidRequestError(f"min_tokens must be at least 0, got {self.min_tokens}")

    @property
    def greedy(self) -> bool:
        # Below MIN_TEMPERATURE, logits / temperature overflows; the limit of sampling there is argmax anyway.
        return self.temperature < MIN_TEMPERATURE


def new_seed() -> int:
    return secrets.randbits(62)


def request_seed(params: SamplingParams, *, draws: bool = True) -> int | None:
    """The seed a request runs with: its own, or a fresh one; None when it `draws` nothing (greedy text)."""
    if params.seed is not None:
        return params.seed
    return new_seed() if draws else None


def image_seeds(seed: int, n: int) -> list[int]:
    """Image i of a request draws from the random stream of seed + i, so batching never changes its draws."""
    return [(seed + i) % 2**63 for i in range(n)]
