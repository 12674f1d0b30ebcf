"""Token selection for a whole batch at once: greedy, temperature, top-k, nucleus (top-p) and min-p
sampling, with a repetition penalty and a floor under the answer's length (EOS masked until `min_tokens`).

Every row draws with one uniform per step from a counter-based stream (`janus_core.sampling.philox`): an
understanding request's stream is keyed by its seed, image i of a generation request by seed + i,
and step t takes the stream's t-th number. The draws therefore depend on (seed, image, step) only:
not on the batch, its order or its size, nor on a preemption in between. No generator object per
row, no per-row kernels or host syncs: `sample` is a handful of batched ops over (rows, vocab).

Seeded outputs changed once, when this scheme replaced one `torch.Generator` per row; the streams
are fixed from here on (a test pins the first uniforms of a seed and a seeded request's tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from janus_core.sampling import philox
from janus_core.sampling.params import SamplingParams


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
    `top_p` their values, and likewise for top-k, min-p and the repetition penalty (whose rows also carry
    `seen`, the tokens of their prompt and answer so far); `ban_eos` marks the rows whose EOS is masked
    this step (None: none). `all_greedy` lets a step of greedy rows skip everything but the argmax, and
    without `any_greedy` no argmax is taken at all.
    """

    temperature: torch.Tensor  # (R,) float32; 1.0 on greedy rows
    greedy: torch.Tensor  # (R,) bool
    uniform: torch.Tensor  # (R,) float64 in (0, 1)
    top_p_rows: torch.Tensor | None = None  # (K,) int64
    top_p: torch.Tensor | None = None  # (K,) float32
    all_greedy: bool = False
    any_greedy: bool = True
    top_k_rows: torch.Tensor | None = None
    top_k: torch.Tensor | None = None  # (K,) int64
    top_k_max: int = 0  # the largest of `top_k` (known on the host: no sync to size the top-k)
    min_p_rows: torch.Tensor | None = None
    min_p: torch.Tensor | None = None  # (K,) float32
    penalty_rows: torch.Tensor | None = None
    penalty: torch.Tensor | None = None  # (K,) float32
    seen: torch.Tensor | None = None  # (K, V) bool: the penalty rows' tokens so far
    ban_eos: torch.Tensor | None = None  # (R,) bool
    eos: int = -1

    @classmethod
    def of(cls, params: list[SamplingParams], uniform: torch.Tensor, device: torch.device, *,
           produced: list[int] | None = None, history: list[list[int]] | None = None, vocab: int = 0,
           eos: int = -1) -> RowSampling:
        """From per-row parameters (built on the host: for prefill, and for tests). `produced[r]`: tokens row r
        has sampled so far (for `min_tokens`); `history[r]`: its prompt and answer tokens (for the penalty)."""
        def where(test) -> list[int]:
            return [i for i, p in enumerate(params) if test(p)]

        def values(rows: list[int], name: str, dtype=None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
            if not rows:
                return None, None
            return (torch.tensor(rows, device=device),
                    torch.tensor([getattr(params[i], name) for i in rows], device=device, dtype=dtype))

        top_p_rows, top_p = values(where(lambda p: not p.greedy and p.top_p < 1.0), "top_p")
        top_k_rows, top_k = values(where(lambda p: not p.greedy and p.top_k > 0), "top_k", torch.long)
        min_p_rows, min_p = values(where(lambda p: not p.greedy and p.min_p > 0.0), "min_p")
        penalized = where(lambda p: p.repetition_penalty != 1.0)
        penalty_rows, penalty = values(penalized, "repetition_penalty", torch.float32)
        seen = None
        if penalized:
            assert history is not None and vocab > 0, "a repetition penalty needs each row's tokens and the vocab size"
            seen = seen_mask([history[i] for i in penalized], vocab, device)
        produced = produced or [0] * len(params)
        banned = [n < p.min_tokens for p, n in zip(params, produced, strict=True)]
        return cls(
            temperature=torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=device),
            greedy=torch.tensor([p.greedy for p in params], device=device),
            uniform=uniform.to(device), top_p_rows=top_p_rows, top_p=top_p,
            all_greedy=all(p.greedy for p in params), any_greedy=any(p.greedy for p in params),
            top_k_rows=top_k_rows, top_k=top_k, top_k_max=max((p.top_k for p in params if not p.greedy), default=0),
            min_p_rows=min_p_rows, min_p=min_p, penalty_rows=penalty_rows, penalty=penalty, seen=seen,
            ban_eos=torch.tensor(banned, device=device) if any(banned) and eos >= 0 else None, eos=eos)


def seen_mask(histories: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """(len(histories), vocab) bool: True where a row's tokens include that id."""
    mask = torch.zeros(len(histories), vocab, dtype=torch.bool, device=device)
    for r, tokens in enumerate(histories):
        if tokens:
            mask[r, torch.tensor(tokens, device=device)] = True
    return mask


def penalize(logits: torch.Tensor, penalty: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """transformers' repetition penalty: a seen token's logit is divided by `penalty` if positive, multiplied
    if negative. `logits` (K, V), `penalty` (K,), `seen` (K, V) bool."""
    p = penalty[:, None]
    return torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)


def top_k_filter(logits: torch.Tensor, k: torch.Tensor, k_max: int) -> torch.Tensor:
    """Mask (to -inf) all but each row's k best logits (ties with the k-th kept, as transformers does)."""
    k_max = min(k_max, logits.shape[-1])
    best = torch.topk(logits, k_max, dim=-1).values  # (K, k_max) descending
    kth = best.gather(-1, (k.clamp(max=k_max) - 1)[:, None])
    return logits.masked_fill(logits < kth, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below min_p times the best one's (compared as logits: the
    softmax's normaliser cancels)."""
    floor = logits.max(dim=-1, keepdim=True).values + torch.log(min_p)[:, None]
    return logits.masked_fill(logits < floor, float("-inf"))


def _rows(logits: torch.Tensor, rows: torch.Tensor | None, fn) -> torch.Tensor:
    return logits if rows is None else logits.index_copy(0, rows, fn(logits[rows]))


def warp(logits: torch.Tensor, rows: RowSampling) -> torch.Tensor:
    """The sampled rows' logits as they are drawn from: over temperature, then top-k, top-p and min-p."""
    scaled = logits / rows.temperature[:, None]
    scaled = _rows(scaled, rows.top_k_rows, lambda x: top_k_filter(x, rows.top_k, rows.top_k_max))
    scaled = _rows(scaled, rows.top_p_rows, lambda x: top_p_filter(x, rows.top_p))
    return _rows(scaled, rows.min_p_rows, lambda x: min_p_filter(x, rows.min_p))


def sample(logits: torch.Tensor, rows: RowSampling) -> torch.Tensor:
    """One token per row of `logits` (R, V) float32, all rows in one pass; returns (R,) int64 on the device.

    First the rows' repetition penalties and EOS masks (they change the argmax too). Greedy rows: the
    exact argmax. Sampled rows: logits / temperature, then top-k, top-p and min-p where asked (each over
    the rows that asked), softmax, then inverse-CDF sampling: the first token whose cumulative
    probability (float64) exceeds the row's uniform times the total. One uniform per row and step, from
    the counter-based stream of its seed, makes a row's draw independent of the batch; zero-probability
    tokens are never chosen (their CDF step is empty).
    """
    if rows.penalty_rows is not None:
        logits = _rows(logits, rows.penalty_rows, lambda x: penalize(x, rows.penalty, rows.seen))
    if rows.ban_eos is not None:
        logits = logits.clone()
        logits[:, rows.eos] = logits[:, rows.eos].masked_fill(rows.ban_eos, float("-inf"))
    if rows.all_greedy:
        return torch.argmax(logits, dim=-1)
    scaled = warp(logits, rows)
    cdf = torch.softmax(scaled, dim=-1).double().cumsum_(dim=-1)  # (R, V)
    target = (rows.uniform * cdf[:, -1])[:, None]
    drawn = torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=logits.shape[-1] - 1)
    return torch.where(rows.greedy, torch.argmax(logits, dim=-1), drawn) if rows.any_greedy else drawn
