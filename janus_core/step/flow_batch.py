"""Batched rectified-flow generation (JanusFlow): many requests' ODE steps in one forward pass.

A request holds two rows of paged KV, computed once at admission and kept for all its images and
steps: the conditional prompt (the chat-formatted prompt without its final begin-of-image token) and
the unconditional one. DeepSeek's unconditional row is BOS followed by pad tokens that its attention
mask hides, so only BOS is visible: we store just BOS, which is the same attention.

Every ODE step of every running image feeds 1 + g*g tokens to the LM, for its cond and its uncond
row: the time embedding, then the latent's patch tokens, at the positions right after the
conditional prompt (both rows: DeepSeek passes no position ids, so the hidden pads keep their
positions). Those tokens' keys and values are the step's own activations, attended beside the
row's prompt KV from the pool and never written to it (each step recomputes them). The last g*g
hidden states become the velocity; CFG `v = w * v_cond - (w - 1) * v_uncond`; `z += v / N` with each
request's own N and w, so requests at different steps, with different step counts and weights,
share a step, and new ones join between steps. Image i starts from noise drawn by its own generator
(seed + i), so batching never changes an image. Latents are kept in fp32 (the network runs in the
model's dtype); t = i / N * 1000 is cast to the model's dtype as DeepSeek's demo does (in bf16 that
rounds it, e.g. 966.7 -> 968). Finished requests are VAE-decoded together; on CUDA on a thread and
stream of their own (`PixelDecoder`), so the next ODE step of the others does not wait for the VAE.
On CPU the VAE runs on the engine thread: a second thread running torch ops keeps a second OpenMP
pool, which slows every engine step (see `server.runtime.run_on_fresh_thread`).

This module knows the flow prompt format, the ODE and latents; the scheduler decides who runs and
which blocks each row holds, the runner's LM layers do the attention over the pool.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from janus_core.attention.paged import PagedKV, PrefillBatch, slots_of
from janus_core.errors import InvalidRequestError
from janus_core.limits import FLOW_CFG_WEIGHT, FLOW_STEPS, check_flow_steps, check_generation, generator_refusal
from janus_core.models.device import measure_peak
from janus_core.models.janusflow import FlowParts
from janus_core.models.loader import LoadedModel
from janus_core.requests import GenerateRequest, GenerateResult
from janus_core.sampling.params import image_seeds, request_seed
from janus_core.sampling.sampler import make_generator
from janus_core.sched.sequence import FLOW, Sequence
from janus_core.simple.generate import prompt_ids
from janus_core.step.batch import Decoded, Foreground, StepOutput, per_sequence
from janus_core.step.pixels import VAE_CHUNK, PixelDecoder, decode_latents
from janus_core.step.runner import ModelRunner


@dataclass(eq=False)
class FlowState:
    prefix: list[int]  # the conditional prompt's ids (without the final begin-of-image)
    n: int
    cfg_weight: float
    num_steps: int
    seed: int
    z: torch.Tensor  # (n, C, L, L) float32 latents on the model's device
    steps: int = 0  # ODE steps taken
    v: torch.Tensor | None = None  # (n, C, L, L) the last step's guided velocity (previews)

    @property
    def tokens(self) -> torch.Tensor:
        """What `GenerateResult.tokens` holds for a flow model: the final latents (n, C, L, L), on CPU."""
        return self.z.cpu()


class StepAttention:
    """Attention of a step's tokens (B rows x T) over each row's prompt KV in the pool and, causally,
    over themselves; driven by `janus_core.attention.paged.paged_attention` through `janus_kv=`."""

    def __init__(self, kv: PagedKV, prefixes: list[list[int]], steps: int) -> None:
        self.kv = kv
        longest = max(len(p) for p in prefixes)
        device = kv.device
        self.slots = torch.tensor([p + [0] * (longest - len(p)) for p in prefixes], device=device)  # (B, P)
        valid = torch.tensor([[True] * len(p) + [False] * (longest - len(p)) for p in prefixes], device=device)
        causal = torch.ones(steps, steps, dtype=torch.bool, device=device).tril()
        self.mask = torch.cat([valid[:, None, :].expand(-1, steps, -1), causal.expand(len(prefixes), -1, -1)],
                              dim=-1)[:, None]  # (B, 1, T, P + T)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        # q, k, v: (B, H, T, D) -> (B, H, T, D)
        pk = self.kv.k[layer][:, self.slots].transpose(0, 1)  # (B, H, P, D)
        pv = self.kv.v[layer][:, self.slots].transpose(0, 1)
        keys, values = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask, scale=scale)


class FlowBatch(Foreground):
    kind = "generate"

    def __init__(self, lm: LoadedModel, runner: ModelRunner, kv: PagedKV, *, max_images: int,
                 max_prompt_tokens: int, wake: Callable[[], None] = lambda: None) -> None:
        self.lm, self.runner, self.kv = lm, runner, kv
        self.parts: FlowParts = lm.flow
        self.max_images, self.max_prompt_tokens = max_images, max_prompt_tokens
        self.net = lm.model.model  # JanusFlowModel
        # On CUDA the VAE decodes off the model loop (`PixelDecoder`); on CPU on the engine thread.
        self.pixels = PixelDecoder(self.parts, wake) if lm.device.type == "cuda" else None

    # --- admission ----------------------------------------------------------------------------------
    def prepare(self, request: GenerateRequest) -> Sequence:
        """Validate and tokenize a request (raises `InvalidRequestError`), draw its noise; it waits for blocks."""
        n = request.n
        weight = FLOW_CFG_WEIGHT if request.cfg_weight is None else request.cfg_weight
        num_steps = FLOW_STEPS if request.steps is None else request.steps
        check_generation(n, weight)
        check_flow_steps(num_steps)
        refusal = generator_refusal("flow", request.given)
        if refusal:
            raise InvalidRequestError(refusal)
        ids = prompt_ids(self.lm, request.prompt, n, max_images=self.max_images,
                         max_prompt_tokens=self.max_prompt_tokens)
        grid = self.parts.grid
        if len(ids) + grid * grid > self.lm.max_context:
            raise InvalidRequestError(f"prompt is {len(ids)} tokens; with {grid * grid + 1} step tokens it exceeds "
                                      f"the context length of {self.lm.max_context}")
        seed = request_seed(request.params)
        state = FlowState(ids[:-1], n, weight, num_steps, seed, self.noise(seed, n))
        return Sequence(request.request_id, "generate", prompt_tokens=len(state.prefix), max_steps=num_steps,
                        width=n, data=state, layout=FLOW)

    def noise(self, seed: int, n: int) -> torch.Tensor:
        """The starting latents of a request's n images: image i from its own generator (seed + i)."""
        p, device = self.parts, self.lm.device
        shape = (p.latent_channels, p.latent_size, p.latent_size)
        return torch.stack([torch.randn(shape, generator=make_generator(s, device), device=device)
                            for s in image_seeds(seed, n)])  # (n, C, L, L) float32

    @torch.inference_mode()
    def prefill(self, seq: Sequence) -> None:
        """Write the request's prompt KV: the conditional prompt and the unconditional BOS (no ODE step yet:
        its first is the next step's, with the others)."""
        state: FlowState = seq.data
        for table, ids in ((seq.tables[0], state.prefix), (seq.tables[1], state.prefix[:1])):
            batch = PrefillBatch.for_rows(self.kv, [table], 0, len(ids))
            self.runner.prefill(batch, self.runner.embed_text(torch.tensor([ids])), 0)

    # --- one ODE step for every running request -----------------------------------------------------
    @torch.inference_mode()
    def launch(self, seqs: list[Sequence]) -> None:
        """One Euler step for every image of `seqs`. Nothing to copy back: the latents stay on the device, and
        each request's progress is its `steps` (`update`)."""
        states: list[FlowState] = [s.data for s in seqs]
        images = [s for s in states for _ in range(s.n)]  # the request of each image, in row order
        device = self.lm.device
        z = torch.cat([s.z for s in states])  # (I, C, L, L) fp32
        # 1. The step's inputs: t_emb and the latent's patch tokens, once per image, fed to its cond and uncond rows.
        t = torch.tensor([s.steps / s.num_steps * 1000.0 for s in images], device=device).to(self.lm.dtype)  # (I,)
        feats, t_emb, skip = self.net.vision_gen_enc_model(z.to(self.lm.dtype), t)  # (I, W, g, g), (I, D), skip
        tokens = self.net.vision_gen_enc_aligner(feats.flatten(2).transpose(1, 2))  # (I, g*g, D)
        rows = torch.cat([t_emb[:, None], tokens], dim=1).repeat_interleave(2, dim=0)  # (2I, T, D): c0 u0 c1 u1 ...
        # 2. The LM over them, attending to each row's prompt KV in the pool.
        hidden = self._run_lm(seqs, rows)  # (2I, T, D)
        # 3. The velocity of every row, and CFG per image with its request's weight.
        v = self._velocity(hidden, skip.repeat_interleave(2, dim=0), t_emb.repeat_interleave(2, dim=0))
        w = torch.tensor([s.cfg_weight for s in images], device=device)[:, None, None, None]
        dt = torch.tensor([1.0 / s.num_steps for s in images], device=device)[:, None, None, None]
        guided = w * v[0::2] - (w - 1.0) * v[1::2]
        z = z + dt * guided
        # 4. Euler: each request keeps its images' new latents (and velocity, for a preview's estimate).
        for s, mine, velocity in zip(states, per_sequence(z, seqs), per_sequence(guided, seqs), strict=True):
            s.z, s.v = mine, velocity
            s.steps += 1

    def update(self, seqs: list[Sequence], chosen: list[int] | None) -> list[StepOutput]:
        """Each request's progress: ODE steps taken of its total."""
        return [StepOutput(seq, None, seq.data.steps, seq.data.num_steps) for seq in seqs]

    def reset(self) -> None:
        """No per-row device state to rebuild: every flow step reads its requests' latents afresh."""

    def _run_lm(self, seqs: list[Sequence], rows: torch.Tensor) -> torch.Tensor:
        """Rows (2I, T, D) at the positions after each request's conditional prompt (uncond rows too)."""
        bs, length, prefixes, starts = self.kv.block_size, rows.shape[1], [], []
        for seq in seqs:
            state: FlowState = seq.data
            cond, uncond = slots_of(seq.tables[0], bs, 0, len(state.prefix)), slots_of(seq.tables[1], bs, 0, 1)
            prefixes += [cond, uncond] * state.n
            starts += [len(state.prefix)] * (2 * state.n)
        device = rows.device
        positions = torch.tensor(starts, device=device)[:, None] + torch.arange(length, device=device)  # (2I, T)
        return self.runner.layers(rows, positions, StepAttention(self.kv, prefixes, length))

    def _velocity(self, hidden: torch.Tensor, skip: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """The last g*g hidden states of each row -> its velocity (2I, C, L, L), in fp32."""
        grid = self.parts.grid
        h = self.net.vision_gen_dec_aligner(self.net.vision_gen_dec_aligner_norm(hidden[:, -grid * grid:]))
        h = h.reshape(h.shape[0], grid, grid, h.shape[-1]).permute(0, 3, 1, 2)  # (2I, W, g, g)
        return self.net.vision_gen_dec_model(h, skip, t_emb).float()

    # --- pixels -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def snapshot(self, seq: Sequence) -> torch.Tensor:
        """A preview's latents: the denoised estimate z + (1 - t) * v at this step (t = steps / N), on the device."""
        state: FlowState = seq.data
        if state.v is None:
            return state.z.clone()
        return state.z + (1.0 - state.steps / state.num_steps) * state.v

    def render(self, snapshot: torch.Tensor) -> np.ndarray:
        return decode_latents(self.parts, snapshot)

    def finish(self, seqs: list[Sequence]) -> list[tuple[Sequence, GenerateResult]]:
        """VAE-decode the finished requests together: now (CPU), or handed to the decoder's thread (CUDA)."""
        z = torch.cat([seq.data.z for seq in seqs])
        if self.pixels is not None:
            self.pixels.submit(seqs, z)
            return []
        return self._results(seqs, decode_latents(self.parts, z))

    def decoded(self, wait: bool = False) -> Decoded:
        """The decoder's finished batches in submission order: results, or the error that failed them."""
        if self.pixels is None:
            return []
        return [(seqs, pixels if isinstance(pixels, BaseException) else [r for _, r in self._results(seqs, pixels)])
                for seqs, pixels in self.pixels.done(wait)]

    @property
    def pending(self) -> bool:
        return self.pixels is not None and self.pixels.pending

    @property
    def ready(self) -> bool:
        return self.pixels is not None and self.pixels.ready

    def close(self) -> None:
        if self.pixels is not None:
            self.pixels.close()

    @staticmethod
    def _results(seqs: list[Sequence], pixels: np.ndarray) -> list[tuple[Sequence, GenerateResult]]:
        return [(seq, GenerateResult(seq.data.seed, seq.data.tokens, one, seq.prompt_tokens))
                for seq, one in zip(seqs, per_sequence(pixels, seqs), strict=True)]

    @staticmethod
    def profile_peak(lm: LoadedModel, runner: ModelRunner, prefill_tokens: int, rows: int) -> int:
        return flow_profile_peak(lm, runner, prefill_tokens, rows)


@torch.inference_mode()
def flow_profile_peak(lm: LoadedModel, runner: ModelRunner, prefill_tokens: int, rows: int) -> int:
    """Bytes above the weights that a prompt prefill, a step of `rows` rows and a VAE call take (CUDA)."""
    device, parts = lm.device, lm.flow
    hidden = lm.model.config.text_config.hidden_size
    step = parts.grid * parts.grid + 1

    def run() -> None:
        for batch, length in ((1, prefill_tokens), (rows, step + 64)):  # a step: its tokens over a 64-token prompt
            runner.core(inputs_embeds=torch.zeros((batch, length, hidden), dtype=lm.dtype, device=device),
                        use_cache=False)
        z = torch.zeros((min(VAE_CHUNK, rows), parts.latent_channels, parts.latent_size, parts.latent_size),
                        device=device)
        decode_latents(parts, z)

    return measure_peak(device, run)
