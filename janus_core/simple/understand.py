"""Single-request understanding: images + prompt -> text with a KV cache.

`stream_understanding` is a generator that yields one `TokenStep` per new token and returns the
final `UnderstandResult`; `understand` drains it. Greedy decoding gives the same tokens as
transformers' `JanusForConditionalGeneration.generate` for the same inputs.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import DynamicCache

from janus_core.errors import InvalidRequestError
from janus_core.models.compat import cache_arg
from janus_core.models.loader import LoadedModel
from janus_core.requests import UnderstandResult
from janus_core.sampling.params import SamplingParams, request_seed
from janus_core.sampling.sampler import RowSampling, sample, stream_uniforms
from janus_core.text.detok import IncrementalDecoder
from janus_core.text.processor import build_understanding_inputs


@dataclass
class TokenStep:
    token_id: int
    delta: str


def embed_prompt(lm: LoadedModel, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
    """Token embeddings with the aligned SigLIP features written over the image placeholders."""
    model = lm.model
    embeds = model.get_input_embeddings()(input_ids)  # (B, T, D)
    if pixel_values is None:
        return embeds
    features = model.model.get_image_features(pixel_values.to(lm.device, lm.dtype)).pooler_output
    mask = (input_ids == model.config.image_token_id).unsqueeze(-1)
    return embeds.masked_scatter(mask, features.reshape(-1, embeds.shape[-1]).to(embeds.dtype))


def check_limits(lm: LoadedModel, prompt_tokens: int, max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise InvalidRequestError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if prompt_tokens + max_new_tokens > lm.max_context:
        raise InvalidRequestError(
            f"prompt ({prompt_tokens} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"context length of {lm.max_context} tokens"
        )


@torch.inference_mode()
def stream_understanding(
    lm: LoadedModel,
    images: Sequence[Image.Image],
    prompt: str,
    *,
    max_new_tokens: int = 256,
    params: SamplingParams | None = None,
) -> Generator[TokenStep, None, UnderstandResult]:
    params = params or SamplingParams()
    inputs = build_understanding_inputs(lm, images, prompt)
    check_limits(lm, len(inputs.input_ids), max_new_tokens)
    seed = request_seed(params, draws=not params.greedy)
    uniforms = stream_uniforms(seed if seed is not None else 0, max_new_tokens)

    ids = torch.tensor([inputs.input_ids], device=lm.device)
    embeds = embed_prompt(lm, ids, inputs.pixel_values)
    cache = DynamicCache(config=lm.model.config.text_config)
    lm_core, head = lm.model.model.language_model, lm.model.lm_head
    decoder = IncrementalDecoder(lm.tokenizer)
    eos = lm.special["eos"]
    out: list[int] = []
    finish = "length"
    position = ids.shape[1]
    hidden = lm_core(inputs_embeds=embeds, **cache_arg(lm_core, cache), use_cache=True).last_hidden_state
    for _ in range(max_new_tokens):
        logits = head(hidden[:, -1, :]).float()[0]
        rows = RowSampling.of([params], uniforms[len(out):len(out) + 1], lm.device, produced=[len(out)],
                              history=[inputs.input_ids + out], vocab=logits.shape[-1], eos=eos)
        token = int(sample(logits[None], rows)[0])
        if token == eos and not params.ignore_eos:
            finish = "stop"
            break
        out.append(token)
        yield TokenStep(token, decoder.push(token))
        if len(out) == max_new_tokens:
            break
        step = lm.model.get_input_embeddings()(torch.tensor([[token]], device=lm.device))
        positions = torch.tensor([[position]], device=lm.device)
        hidden = lm_core(inputs_embeds=step, **cache_arg(lm_core, cache), use_cache=True,
                         position_ids=positions).last_hidden_state
        position += 1
    return UnderstandResult(decoder.text, finish, len(inputs.input_ids), len(out), out, seed)


def understand(lm: LoadedModel, images: Sequence[Image.Image], prompt: str, *, max_new_tokens: int = 256,
               params: SamplingParams | None = None) -> UnderstandResult:
    stream = stream_understanding(lm, images, prompt, max_new_tokens=max_new_tokens, params=params)
    while True:
        try:
            next(stream)
        except StopIteration as done:
            return done.value
