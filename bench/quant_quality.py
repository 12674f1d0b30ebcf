"""How far quantized weights move Janus's outputs: teacher-forced distributions and greedy tokens.

Both models see the same inputs (teacher forcing), so every position compares one next-token distribution
with another: KL(full || quantized) in nats and whether the two argmaxes agree. Understanding: chat prompts
with an answer of random words. Image codes: a generation prompt, its CFG pair, and codes drawn at random,
compared on the guided logits that sampling reads. Random weights make nearly flat distributions whose
argmax a tiny change can flip, so top-1 agreement here is a floor for real checkpoints, not an estimate.

Used by bench/bench_quant.py and by the tests that hold its bounds (tests/model/test_quantized.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from janus_core.limits import VQ_CFG_WEIGHT
from janus_core.models.loader import LoadedModel
from janus_core.text.processor import build_generation_ids, unconditional_ids, understanding_text

WORDS = ("red", "boat", "quiet", "mountain", "under", "seven", "glass", "river", "bright", "owl", "paper", "city",
         "slowly", "winter", "lamp", "green", "across", "market", "cloud", "stone")


def prompts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "?" for _ in range(count)]


@dataclass
class Agreement:
    kl: list[float]  # per position, nats
    top1: list[bool]

    @property
    def mean_kl(self) -> float:
        return sum(self.kl) / len(self.kl)

    @property
    def max_kl(self) -> float:
        return max(self.kl)

    @property
    def top1_rate(self) -> float:
        return sum(self.top1) / len(self.top1)

    def add(self, full: torch.Tensor, quant: torch.Tensor) -> None:
        """Rows of logits (T, V) from each model for the same positions."""
        p, q = full.float().log_softmax(-1), quant.float().log_softmax(-1)
        self.kl += (p.exp() * (p - q)).sum(-1).clamp_min(0).tolist()
        self.top1 += (full.argmax(-1) == quant.argmax(-1)).tolist()


@torch.inference_mode()
def text_logits(lm: LoadedModel, ids: list[int]) -> torch.Tensor:
    core = lm.model.model.language_model
    hidden = core(input_ids=torch.tensor([ids], device=lm.device)).last_hidden_state[0]
    return lm.model.lm_head(hidden).float()


@torch.inference_mode()
def guided_code_logits(lm: LoadedModel, prompt: str, codes: torch.Tensor, cfg_weight: float) -> torch.Tensor:
    """Guided logits (N, V_image) for each of `codes`' positions, the earlier codes fed back (teacher forcing)."""
    cond = build_generation_ids(lm, prompt)
    pair = torch.tensor([cond, unconditional_ids(lm, cond)], device=lm.device)
    model = lm.model
    fed = model.prepare_embeddings_for_image_generation(codes[:-1].to(lm.device).repeat(2, 1))  # (2, N-1, D)
    embeds = torch.cat([model.get_input_embeddings()(pair), fed.to(lm.dtype)], dim=1)
    hidden = model.model.language_model(inputs_embeds=embeds).last_hidden_state[:, pair.shape[1] - 1:]
    logits = model.model.generation_head(hidden).float()  # (2, N, V)
    return logits[1] + cfg_weight * (logits[0] - logits[1])


def teacher_forced_text(full: LoadedModel, quant: LoadedModel, count: int, answer_words: int = 16,
                        seed: int = 0) -> Agreement:
    rng = random.Random(seed + 1)
    result = Agreement([], [])
    for prompt in prompts(count, seed):
        ids = full.tokenizer(understanding_text(full, prompt, 0))["input_ids"]
        answer = full.tokenizer(" ".join(rng.choice(WORDS) for _ in range(answer_words)),
                                add_special_tokens=False)["input_ids"]
        start = len(ids) - 1  # the position that predicts the answer's first token
        seq = ids + answer
        result.add(text_logits(full, seq)[start:], text_logits(quant, seq)[start:])
    return result


def teacher_forced_codes(full: LoadedModel, quant: LoadedModel, count: int, positions: int | None = None,
                         seed: int = 0) -> Agreement:
    positions = positions or full.num_image_tokens
    vocab = int(full.model.config.vq_config.num_embeddings)
    gen = torch.Generator().manual_seed(seed)
    result = Agreement([], [])
    for prompt in prompts(count, seed + 2):
        codes = torch.randint(0, vocab, (positions,), generator=gen)
        result.add(guided_code_logits(full, prompt, codes, VQ_CFG_WEIGHT),
                   guided_code_logits(quant, prompt, codes, VQ_CFG_WEIGHT))
    return result


def token_agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """Greedy outputs of two models: the share of equal tokens position by position, and the mean share of each
    output before the first difference."""
    same = sum(x == y for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=False))
    total = sum(max(len(ra), len(rb)) for ra, rb in zip(a, b, strict=True))
    prefixes = []
    for ra, rb in zip(a, b, strict=True):
        k = next((i for i, (x, y) in enumerate(zip(ra, rb, strict=False)) if x != y), min(len(ra), len(rb)))
        prefixes.append(k / max(len(ra), len(rb), 1))
    return same / max(total, 1), sum(prefixes) / len(prefixes)
