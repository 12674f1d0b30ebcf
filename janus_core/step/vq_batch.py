"""Batched CFG image generation: many requests (each with n images) decode in one forward pass.

Each image owns two rows of paged KV, cond and uncond, laid out [c0, u0, c1, u1, ...] in its
request's block tables. The full prompt blocks of each side are held once and shared by reference
by all n images; the pair is prefilled once into image 0's rows and the partial last prompt block
copied into each other image's first own block. Each step feeds every image's last code at its own
position (requests that joined later are at earlier positions), applies the guidance
`uncond + cfg_weight * (cond - uncond)` per image, and samples all images in one pass, each from its
own counter-based stream (seed + i: `janus_core.sampling.params.image_seeds`), so the draws do not depend on the
rest of the batch. Finished requests are VQ-decoded one image at a time (byte-reproducible pixels).

This module knows the generation prompt format, CFG and image codes; the scheduler decides who
runs and which blocks each row holds, the runner does the tensor work, and PNG encoding is left to
the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from janus_core.attention.paged import PagedKV, PrefillBatch, slots_of
from janus_core.errors import InvalidRequestError
from janus_core.limits import VQ_CFG_WEIGHT, check_generation, generator_refusal
from janus_core.models.loader import LoadedModel
from janus_core.requests import GenerateRequest, GenerateResult
from janus_core.sampling.params import SamplingParams, image_seeds, request_seed
from janus_core.sampling.sampler import RowSampling, sample, stream_uniforms
from janus_core.sched.sequence import CFG_PAIR, Sequence
from janus_core.simple.generate import prompt_ids
from janus_core.step.batch import Foreground, StepOutput, per_sequence
from janus_core.step.pixels import decode_images, decode_rows
from janus_core.step.rows import DecodeRows, RowValues
from janus_core.step.runner import ModelRunner
from janus_core.text.processor import unconditional_ids


@dataclass(eq=False)
class GenerationState:
    pair: torch.Tensor  # (2, T) cond and uncond prompt ids
    n: int
    cfg_weight: float
    params: SamplingParams
    seed: int
    uniforms: torch.Tensor  # (n, num_image_tokens) float64: image i's draws (stream seed + i); (n, 1) if greedy
    tokens: torch.Tensor  # (n, num_image_tokens) int64 on CPU, filled step by step
    steps: int = 0  # codes sampled so far per image

    @property
    def prompt_len(self) -> int:
        return self.pair.shape[1]


class VQBatch(Foreground):
    kind = "generate"
    defer_finish = True  # VQ decoding, image by image, can run while the device computes the next step

    def __init__(self, lm: LoadedModel, runner: ModelRunner, kv: PagedKV, *, max_images: int,
                 max_prompt_tokens: int, wake: Callable[[], None] | None = None) -> None:
        # `wake`: unused; a VQ batch has no background work to report
        self.lm, self.runner, self.kv = lm, runner, kv
        self.max_images, self.max_prompt_tokens = max_images, max_prompt_tokens
        self.rows = DecodeRows(max_images, lm.num_image_tokens, lm.device)  # one sampling row per image

    def prepare(self, request: GenerateRequest) -> Sequence:
        """Validate and tokenize a request (raises `InvalidRequestError`); the sequence waits for blocks."""
        refusal = generator_refusal("vq", ["steps"] if request.steps is not None else [])
        if refusal:
            raise InvalidRequestError(refusal)
        n, params, prompt = request.n, request.params, request.prompt
        cfg_weight = VQ_CFG_WEIGHT if request.cfg_weight is None else request.cfg_weight
        check_generation(n, cfg_weight)
        cond = prompt_ids(self.lm, prompt, n, max_images=self.max_images, max_prompt_tokens=self.max_prompt_tokens)
        total = len(cond) + self.lm.num_image_tokens
        if total > self.lm.max_context:
            raise InvalidRequestError(f"prompt is {len(cond)} tokens; with {self.lm.num_image_tokens} image tokens "
                                      f"it exceeds the generation context length of {self.lm.max_context}")
        seed = request_seed(params)
        steps = 1 if params.greedy else self.lm.num_image_tokens
        state = GenerationState(
            pair=torch.tensor([cond, unconditional_ids(self.lm, cond)]), n=n, cfg_weight=cfg_weight,
            params=params, seed=seed, uniforms=torch.stack([stream_uniforms(s, steps) for s in image_seeds(seed, n)]),
            tokens=torch.zeros((n, self.lm.num_image_tokens), dtype=torch.long),
        )
        return Sequence(request.request_id, "generate", prompt_tokens=len(cond), max_steps=self.lm.num_image_tokens,
                        width=n, data=state, layout=CFG_PAIR)

    def prefill(self, seq: Sequence) -> torch.Tensor:
        """Prefill the CFG pair once, copy its partial block to every image's rows; each image's first code (n,)."""
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
        rows = RowSampling.of([state.params] * state.n, state.uniforms[:, 0], guided.device)
        return sample(guided.expand(state.n, -1), rows)

    def launch(self, seqs: list[Sequence]) -> torch.Tensor:
        """Queue one step for every running request's rows; returns the new code of each image (I,) on the device.

        The inputs come from the preallocated rows (`janus_core.step.rows`): rebuilt only when requests
        joined or left; the codes chosen are written back there on the device.
        """
        rows = self.rows
        rows.sync(seqs, lambda seq: seq.data.n, self._values)
        images = rows.count
        positions = np.repeat(rows.host_position[:images], 2).tolist()  # rows [c0, u0, c1, u1, ...]
        logits = self.runner.decode_logits(self.kv, "image", [t for seq in seqs for t in seq.tables], positions,
                                           rows.last[:images].repeat_interleave(2),
                                           rows.position[:images].repeat_interleave(2))  # (R, V)
        cond, uncond = logits[0::2], logits[1::2]  # (I, V) each
        guided = uncond + rows.cfg_weight[:images, None] * (cond - uncond)  # (I, V)
        chosen = sample(guided, rows.sampling())
        rows.advance(chosen)
        return chosen

    def reset(self) -> None:
        """Forget the row state (after a failed step): the next `launch` writes every row afresh."""
        self.rows.reset()

    @staticmethod
    def _values(seq: Sequence) -> RowValues:
        state: GenerationState = seq.data
        p = state.params
        return RowValues(last=state.tokens[:, state.steps - 1], position=state.prompt_len + state.steps - 1,
                         step=state.steps, temperature=p.temperature, top_p=p.top_p, greedy=p.greedy,
                         uniforms=state.uniforms, cfg_weight=state.cfg_weight)

    def update(self, seqs: list[Sequence], chosen: list[int] | None) -> list[StepOutput]:
        """Store one step's codes (all images of `seqs`, in order) in the requests."""
        assert chosen is not None
        outputs = []
        for seq, codes in zip(seqs, per_sequence(chosen, seqs), strict=True):
            state: GenerationState = seq.data
            state.tokens[:, state.steps] = torch.tensor(codes)
            state.steps += 1
            outputs.append(StepOutput(seq, None, state.steps, seq.max_steps))
        return outputs

    def snapshot(self, seq: Sequence) -> torch.Tensor:
        """A preview's codes: those sampled so far (n, steps), on the host."""
        state: GenerationState = seq.data
        return state.tokens[:, :state.steps].clone()

    def render(self, snapshot: torch.Tensor) -> np.ndarray:
        """The complete rows of codes decoded, the rest grey (`decode_rows`)."""
        return decode_rows(self.lm, snapshot)

    def finish(self, seqs: list[Sequence]) -> list[tuple[Sequence, GenerateResult]]:
        """VQ-decode the finished requests (image by image: `decode_images`, byte-reproducible pixels)."""
        return [(seq, GenerateResult(seq.data.seed, seq.data.tokens, decode_images(self.lm, seq.data.tokens),
                                     seq.prompt_tokens, self.lm.num_image_tokens)) for seq in seqs]

    @staticmethod
    def profile_peak(lm: LoadedModel, runner: ModelRunner, prefill_tokens: int, rows: int) -> int:
        return runner.profile_peak(prefill_tokens, rows)
