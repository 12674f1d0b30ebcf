"""Batched CFG image generation: many requests (each with n images) decode in one forward pass.

Each image owns two rows of paged KV, cond and uncond, laid out [c0, u0, c1, u1, ...] in its
request's block tables. The full prompt blocks of each side are held once and shared by reference
by all n images; the pair is prefilled once into image 0's rows and the partial last prompt block
copied into each other image's first own block. Each step feeds every image's last code at its own
position (requests that joined later are at earlier positions), applies the guidance
`uncond + cfg_weight * (cond - uncond)` per image, and samples with that image's own generator
(seed + i, as `generation.image_seeds`), so the draws do not depend on the rest of the batch.
Finished requests are VQ-decoded together.

This module knows the generation prompt format, CFG and image codes; the scheduler decides who
runs and which blocks each row holds, the runner does the tensor work, and PNG encoding is left to
the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from janus_core.errors import InvalidRequestError
from janus_core.generation import check_generation, decode_images, image_seeds
from janus_core.kv_cache import DecodeBatch, PagedKV, PrefillBatch, slots_of
from janus_core.loading import LoadedModel
from janus_core.processor import build_generation_ids, unconditional_ids
from janus_core.runner import ModelRunner, sample_rows
from janus_core.sampling import SamplingParams, make_generator, new_seed
from janus_core.scheduler import Sequence


@dataclass(eq=False)
class GenerationState:
    pair: torch.Tensor  # (2, T) cond and uncond prompt ids
    n: int
    cfg_weight: float
    params: SamplingParams
    seed: int
    generators: list[torch.Generator | None]  # one per image; None when greedy
    tokens: torch.Tensor  # (n, num_image_tokens) int64 on CPU, filled step by step
    steps: int = 0  # codes sampled so far per image

    @property
    def prompt_len(self) -> int:
        return self.pair.shape[1]

    @property
    def last(self) -> list[int]:
        return self.tokens[:, self.steps - 1].tolist()


class GenerationBatch:
    def __init__(self, lm: LoadedModel, runner: ModelRunner, kv: PagedKV, *, max_images: int,
                 max_prompt_tokens: int) -> None:
        self.lm, self.runner, self.kv = lm, runner, kv
        self.max_images, self.max_prompt_tokens = max_images, max_prompt_tokens

    def prepare(self, request_id: str, prompt: str, n: int, cfg_weight: float,
                params: SamplingParams) -> Sequence:
        """Validate and tokenize a request (raises `InvalidRequestError`); the sequence waits for blocks."""
        check_generation(n, cfg_weight)
        if n > self.max_images:
            raise InvalidRequestError(f"n={n} exceeds the engine's limit of {self.max_images} images at once")
        cond = build_generation_ids(self.lm, prompt)
        if len(cond) > self.max_prompt_tokens:
            raise InvalidRequestError(f"prompt is {len(cond)} tokens; generation prompts may have at most "
                                      f"{self.max_prompt_tokens}")
        total = len(cond) + self.lm.num_image_tokens
        if total > self.lm.max_context:
            raise InvalidRequestError(f"prompt is {len(cond)} tokens; with {self.lm.num_image_tokens} image tokens "
                                      f"it exceeds the generation context length of {self.lm.max_context}")
        seed = params.seed if params.seed is not None else new_seed()
        generators = [None if params.greedy else make_generator(s, self.lm.device) for s in image_seeds(seed, n)]
        state = GenerationState(
            pair=torch.tensor([cond, unconditional_ids(self.lm, cond)]), n=n, cfg_weight=cfg_weight,
            params=params, seed=seed, generators=generators,
            tokens=torch.zeros((n, self.lm.num_image_tokens), dtype=torch.long),
        )
        return Sequence(request_id, "generate", prompt_tokens=len(cond), max_tokens=self.lm.num_image_tokens,
                        width=n, data=state)

    def prefill(self, seq: Sequence) -> list[int]:
        """Prefill the CFG pair once, copy its partial block to every image's rows, sample each image's first code."""
        state: GenerationState = seq.data
        bs, length = self.kv.block_size, state.prompt_len
        batch = PrefillBatch.for_rows(self.kv, seq.tables[:2], 0, length)
        hidden = self.runner.prefill(batch, self.runner.embed_text(state.pair), 0)  # (2, D)
        tail = length - length % bs  # the partial block's first position: shared blocks end there
        if state.n > 1 and tail < length:
            src = [s for t in seq.tables[:2] for s in slots_of(t, bs, tail, length)] * (state.n - 1)
            dst = [s for t in seq.tables[2:] for s in slots_of(t, bs, tail, length)]
            self.kv.copy_slots(src, dst)
        logits = self.runner.image_logits(hidden)  # (2, V)
        guided = logits[1:] + state.cfg_weight * (logits[:1] - logits[1:])  # (1, V)
        return self._record(state, sample_rows(guided.expand(state.n, -1), [state.params] * state.n,
                                               state.generators))

    def decode(self, seqs: list[Sequence]) -> list[list[int]]:
        """One step for every running request's rows; returns the new code of each image."""
        tables, positions, codes, weights = [], [], [], []
        for seq in seqs:
            state: GenerationState = seq.data
            tables += seq.tables
            positions += [state.prompt_len + state.steps - 1] * len(seq.tables)
            codes += torch.tensor(state.last).repeat_interleave(2).tolist()
            weights += [state.cfg_weight] * state.n
        batch = DecodeBatch.for_rows(self.kv, tables, positions)
        ids = torch.tensor(codes)[:, None]  # (R, 1)
        hidden = self.runner.decode(batch, self.runner.embed_image_tokens(ids), torch.tensor(positions))  # (R, D)
        logits = self.runner.image_logits(hidden)  # (R, V)
        cond, uncond = logits[0::2], logits[1::2]  # (I, V) each
        weight = torch.tensor(weights, device=logits.device, dtype=logits.dtype)[:, None]  # (I, 1)
        guided = uncond + weight * (cond - uncond)  # (I, V)
        params = [seq.data.params for seq in seqs for _ in range(seq.data.n)]
        generators = [g for seq in seqs for g in seq.data.generators]
        chosen = sample_rows(guided, params, generators)
        out, at = [], 0
        for seq in seqs:
            out.append(self._record(seq.data, chosen[at:at + seq.data.n]))
            at += seq.data.n
        return out

    @staticmethod
    def _record(state: GenerationState, codes: list[int]) -> list[int]:
        state.tokens[:, state.steps] = torch.tensor(codes)
        state.steps += 1
        return codes

    def decode_pixels(self, seqs: list[Sequence]) -> list[np.ndarray]:
        """VQ-decode the finished requests together; one (n, H, W, 3) uint8 array per request."""
        if not seqs:
            return []
        pixels = decode_images(self.lm, torch.cat([seq.data.tokens for seq in seqs]))
        counts = np.cumsum([seq.data.n for seq in seqs])[:-1]
        return list(np.split(pixels, counts))
