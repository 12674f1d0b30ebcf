"""Single-request image generation: prompt -> n images with classifier-free guidance (CFG).

The LM predicts `num_image_tokens` VQ codes one at a time. Each image has two rows: the
conditional prompt and the unconditional one (only BOS and `<begin_of_image>` kept). The pair is
prefilled once and its KV cache copied to the n images. Guided logits are
`uncond + cfg_weight * (cond - uncond)`. The VQ decoder turns codes into pixels.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Generator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import DynamicCache

from janus_core.errors import InvalidRequestError
from janus_core.models.compat import cache_arg
from janus_core.models.loader import LoadedModel
from janus_core.sampling.sampler import RowSampling, SamplingParams, new_seed, sample, stream_uniforms
from janus_core.text.processor import build_generation_ids, unconditional_ids


@dataclass
class GenerateResult:
    seed: int
    tokens: torch.Tensor  # (n, num_image_tokens) int64, on CPU
    images: np.ndarray  # (n, H, W, 3) uint8


def check_generation(n: int, cfg_weight: float) -> None:
    if n < 1:
        raise InvalidRequestError(f"n must be at least 1, got {n}")
    if not (0.0 <= cfg_weight <= 100.0):
        raise InvalidRequestError(f"cfg_weight must be between 0 and 100, got {cfg_weight}")


def prompt_ids(lm: LoadedModel, prompt: str, n: int, *, max_images: int, max_prompt_tokens: int) -> list[int]:
    """A generation request's conditional prompt ids, after the engine's limits every generator shares."""
    if n > max_images:
        raise InvalidRequestError(f"n={n} exceeds the engine's limit of {max_images} images at once")
    ids = build_generation_ids(lm, prompt)
    if len(ids) > max_prompt_tokens:
        raise InvalidRequestError(f"prompt is {len(ids)} tokens; generation prompts may have at most "
                                  f"{max_prompt_tokens}")
    return ids


def image_seeds(seed: int, n: int) -> list[int]:
    """Image i of a request draws from the random stream of seed + i, so batching never changes its draws."""
    return [(seed + i) % 2**63 for i in range(n)]


@torch.inference_mode()
def stream_image_tokens(
    lm: LoadedModel, prompt: str, *, n: int = 1, cfg_weight: float = 5.0, params: SamplingParams | None = None
) -> Generator[int, None, tuple[int, torch.Tensor]]:
    """Yield the step index after each of the `num_image_tokens` steps; return (seed, tokens (n, N))."""
    params = params or SamplingParams(temperature=1.0)
    check_generation(n, cfg_weight)
    seed = params.seed if params.seed is not None else new_seed()
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


@torch.inference_mode()
def decode_images(lm: LoadedModel, tokens: torch.Tensor) -> np.ndarray:
    """VQ-decode image tokens (n, N) into uint8 pixels (n, H, W, 3), post-processed as the reference does.

    One image per decoder call: a convolution's rounding can depend on the batch it runs in, and an
    image's pixels must depend on its codes only (a seed gives the same PNG bytes alone, as image i of
    a request, and beside other requests). The decoder is well under 1% of a request's time.
    """
    return np.concatenate([_decode(lm, tokens[i:i + 1]) for i in range(tokens.shape[0])])


def _decode(lm: LoadedModel, tokens: torch.Tensor) -> np.ndarray:
    decoded = lm.model.decode_image_tokens(tokens.to(lm.device)).float().cpu()  # (1, H, W, 3) in [-1, 1]
    # Channels first: the PIL backend of the image processor normalises channel-first arrays only.
    planes = list(decoded.permute(0, 3, 1, 2).numpy())
    pil = lm.processor.postprocess(planes, return_tensors="PIL.Image.Image",
                                   input_data_format="channels_first")["pixel_values"]
    return np.stack([np.asarray(im) for im in pil])


def generate_images(
    lm: LoadedModel,
    prompt: str,
    *,
    n: int = 1,
    cfg_weight: float = 5.0,
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


def encode_png(pixels: np.ndarray) -> bytes:
    """One (H, W, 3) uint8 image as PNG bytes."""
    return encode_image(pixels)


IMAGE_FORMATS = ("png", "jpeg", "webp")


def encode_image(pixels: np.ndarray, output_format: str = "png", quality: int | None = None) -> bytes:
    """One (H, W, 3) uint8 image as PNG, JPEG or WebP bytes (Pillow's encoders: the same pixels give the same
    bytes). `quality` (0-100) applies to JPEG and WebP; None: Pillow's default (75 and 80)."""
    if output_format not in IMAGE_FORMATS:
        raise ValueError(f"output_format must be one of {', '.join(IMAGE_FORMATS)}, got {output_format!r}")
    buf = io.BytesIO()
    image = Image.fromarray(pixels)
    if output_format == "png":
        image.save(buf, format="PNG", compress_level=6)
    else:
        image.save(buf, format=output_format.upper(), **({} if quality is None else {"quality": quality}))
    return buf.getvalue()
