"""Single-request image generation: prompt -> n images with classifier-free guidance (CFG).

The LM predicts `num_image_tokens` VQ codes one at a time. Each image has two rows: the
conditional prompt and the unconditional one (only BOS and `<begin_of_image>` kept). The pair is
prefilled once and its KV cache copied to the n images. Guided logits are
`uncond + cfg_weight * (cond - uncond)`. The VQ decoder turns codes into pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Generator

import torch
from transformers import DynamicCache

from janus_core.errors import InvalidRequestError
from janus_core.limits import VQ_CFG_WEIGHT, check_generation
from janus_core.models.compat import cache_arg
from janus_core.models.loader import LoadedModel
from janus_core.requests import GenerateResult
from janus_core.sampling.params import SamplingParams, image_seeds, request_seed
from janus_core.sampling.sampler import RowSampling, sample, stream_uniforms
from janus_core.step.pixels import decode_images
from janus_core.text.processor import build_generation_ids, unconditional_ids


def prompt_ids(lm: LoadedModel, prompt: str, n: int, *, max_images: int, max_prompt_tokens: int) -> list[int]:
    """A generation request's conditional prompt ids, after the engine's limits every generator shares."""
    if n > max_images:
        raise InvalidRequestError(f"n={n} exceeds the engine's limit of {max_images} images at once")
    ids = build_generation_ids(lm, prompt)
    if len(ids) > max_prompt_tokens:
        raise InvalidRequestError(f"prompt is {len(ids)} tokens; generation prompts may have at most "
                                  f"{max_prompt_tokens}")
    return ids


@torch.inference_mode()
def stream_image_tokens(
    lm: LoadedModel, prompt: str, *, n: int = 1, cfg_weight: float = VQ_CFG_WEIGHT, params: SamplingParams | None = None
) -> Generator[int, None, tuple[int, torch.Tensor]]:
    """Yield the step index after each of the `num_image_tokens` steps; return (seed, tokens (n, N))."""
    params = params or SamplingParams(temperature=1.0)
    check_generation(n, cfg_weight)
    seed = request_seed(params)
    uniforms = torch.stack([stream_uniforms(s, lm.num_image_tokens) for s in image_seeds(seed, n)])  # (n, N)
    model = lm.model
    cond = build_generation_ids(lm, prompt)
    pair = torch.tensor([cond, unconditional_ids(lm, cond)], device=lm.device)  # (2, T)
    if pair.shape[1] + lm.num_image_tokens > lm.max_context:
        raise InvalidRequestError(f"prompt is {pair.shape[1]} tokens; with {lm.num_image_tokens} image tokens "
                                  f"it exceeds the context length of {lm.max_context}")
    cache = DynamicCache(config=model.config.text_config)
    lm_core = model.model.language_model
    hidden = lm_core(inputs_embeds=model.get_input_embeddings()(pair), **cache_arg(lm_core, cache),
                     use_cache=True).last_hidden_state[:, -1, :]  # (2, D)
    # Rows become [cond x n, uncond x n]; the prefill ran once for the pair.
    cache.batch_repeat_interleave(n)
    hidden = hidden.repeat_interleave(n, dim=0)
    tokens = torch.zeros((n, lm.num_image_tokens), dtype=torch.long)
    position = pair.shape[1]
    for step in range(lm.num_image_tokens):
        logits = model.model.generation_head(hidden).float()  # (2n, V)
        guided = logits[n:] + cfg_weight * (logits[:n] - logits[n:])
        chosen = sample(guided, RowSampling.of([params] * n, uniforms[:, step], lm.device)).tolist()
        tokens[:, step] = torch.tensor(chosen)
        yield step + 1
        if step + 1 == lm.num_image_tokens:
            break
        nxt = torch.tensor(chosen, device=lm.device).repeat(2).unsqueeze(-1)  # (2n, 1)
        embeds = model.prepare_embeddings_for_image_generation(nxt)
        positions = torch.full((2 * n, 1), position, device=lm.device)
        hidden = lm_core(inputs_embeds=embeds, **cache_arg(lm_core, cache), use_cache=True,
                         position_ids=positions).last_hidden_state[:, -1, :]
        position += 1
    return seed, tokens


def generate_images(
    lm: LoadedModel,
    prompt: str,
    *,
    n: int = 1,
    cfg_weight: float = VQ_CFG_WEIGHT,
    params: SamplingParams | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> GenerateResult:
    stream = stream_image_tokens(lm, prompt, n=n, cfg_weight=cfg_weight, params=params)
    while True:
        try:
            step = next(stream)
        except StopIteration as done:
            seed, tokens = done.value
            break
        if on_step is not None:
            on_step(step, lm.num_image_tokens)
    return GenerateResult(seed, tokens, decode_images(lm, tokens))
