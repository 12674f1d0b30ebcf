"""Batched CFG image generation: many requests (each with n images) decode in one forward pass.

Each image owns two KV-cache rows, cond and uncond, laid out [c0, u0, c1, u1, ...] within its
request's rows. A request's pair is prefilled once and copied to its other images. Each step
feeds every image's last code at its own position (requests that joined later are at earlier
positions), applies the guidance `uncond + cfg_weight * (cond - uncond)` per image, and samples
with that image's own generator (seed + i, as `generation.image_seeds`), so the draws do not depend
on the rest of the batch. Finished requests are VQ-decoded together.

This module knows the generation prompt format, CFG and image codes; the scheduler decides who
runs, the runner does the tensor work, and PNG encoding is left to the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from janus_core.errors import InvalidRequestError
from janus_core.generation import check_generation, decode_images, image_seeds
from janus_core.kv_cache import KVCache
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
    def __init__(self, lm: LoadedModel, runner: ModelRunner, cache: KVCache) -> None:
        self.lm, self.runner, self.cache = lm, runner, cache

    def prepare(self, request_id: str, prompt: str, n: int, cfg_weight: float,
                params: SamplingParams) -> Sequence:
        """Validate and tokenize a request (raises `InvalidRequestError`); the sequence waits for rows."""
        check_generation(n, cfg_weight)
        if 2 * n > self.cache.rows:
            raise InvalidRequestError(f"n={n} exceeds the engine's limit of {self.cache.rows // 2} images per batch")
        cond = build_generation_ids(self.lm, prompt)
        total = len(cond) + self.lm.num_image_tokens
        limit = min(self.cache.max_len, self.lm.max_context)
        if total > limit:
            raise InvalidRequestError(f"prompt is {len(cond)} tokens; with {self.lm.num_image_tokens} image tokens "
                                      f"it exceeds the generation context length of {limit}")
        seed = params.seed if params.seed is not None else new_seed()
        generators = [None if params.greedy else make_generator(s, self.lm.device) for s in image_seeds(seed, n)]
        state = GenerationState(
            pair=torch.tensor([cond, unconditional_ids(self.lm, cond)]), n=n, cfg_weight=cfg_weight,
            params=params, seed=seed, generators=generators,
            tokens=torch.zeros((n, self.lm.num_image_tokens), dtype=torch.long),
        )
        return Sequence(request_id, "generate", num_rows=2 * n, prompt_tokens=2 * len(cond),
                        max_tokens=self.lm.num_image_tokens, data=state)

    def prefill(self, seq: Sequence) -> list[int]:
        """Prefill the CFG pair once, copy it to every image's rows, sample the first code of each image."""
        state: GenerationState = seq.data
        pair_rows = seq.rows[:2]
        hidden = self.runner.prefill(self.cache, pair_rows, self.runner.embed_text(state.pair))  # (2, D)
        if state.n > 1:
            self.cache.copy_rows(pair_rows * (state.n - 1), seq.rows[2:], state.prompt_len)
        logits = self.runner.image_logits(hidden)  # (2, V)
        guided = logits[1:] + state.cfg_weight * (logits[:1] - logits[1:])  # (1, V)
        return self._record(state, sample_rows(guided.expand(state.n, -1), [state.params] * state.n,
                                               state.generators))

    def decode(self, seqs: list[Sequence], width: int) -> list[list[int]]:
        """One step for every running request: rows [0, width); returns the new code of each image."""
        ids = torch.zeros((width, 1), dtype=torch.long)
        positions = torch.zeros(width, dtype=torch.long)
        cond_rows: list[int] = []
        weights: list[float] = []
        for seq in seqs:
            state: GenerationState = seq.data
            rows = torch.tensor(seq.rows)
            ids[rows, 0] = torch.tensor(state.last).repeat_interleave(2)
            positions[rows] = state.prompt_len + state.steps - 1
            cond_rows += seq.rows[0::2]
            weights += [state.cfg_weight] * state.n
        hidden = self.runner.decode(self.cache, self.runner.embed_image_tokens(ids), positions)  # (width, D)
        logits = self.runner.image_logits(hidden)  # (width, V)
        cond_idx = torch.tensor(cond_rows, device=logits.device)
        cond, uncond = logits[cond_idx], logits[cond_idx + 1]  # (I, V) each
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
