"""Continuously batched understanding: requests join and leave the decode batch at every token.

Each request owns one KV-cache row. Admission prefills its prompt into that row; after that a
decode step feeds every running request's last token at its own position. Two caches save work:
- vision features by image content (a `ByteLRU` keyed by `image_key`): a repeated image skips SigLIP;
- prompt prefixes (a `ByteLRU` of `CachedPrefix`): the keys/values of everything up to the end of the last image
  (system prompt + images) are kept, so a second question about the same image(s) copies them
  into its row and prefills only the question. The tokens every prompt starts with (BOS, the
  system prompt and the user-turn marker: the longest run of ids a prompt shares with the empty
  prompt's) are kept the same way, so a request with a new image or no image skips those too.

This module knows the understanding prompt format, limits and detokenisation; the scheduler
decides who runs and the runner does the tensor work.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from janus_core.conversation import Message
from janus_core.detok import IncrementalDecoder
from janus_core.errors import InvalidRequestError
from janus_core.kv_cache import CachedPrefix, KVCache
from janus_core.loading import LoadedModel
from janus_core.lru import ByteLRU
from janus_core.processor import build_conversation_inputs, build_understanding_inputs
from janus_core.runner import ModelRunner, sample_rows
from janus_core.sampling import SamplingParams, make_generator, new_seed
from janus_core.scheduler import Sequence as Seq
from janus_core.understanding import check_limits
from janus_core.vision_cache import image_key


@dataclass(eq=False)
class UnderstandingState:
    ids: list[int]
    pixels: torch.Tensor | None  # (num_images, 3, H, W)
    image_keys: list[str]
    prefix_key: Hashable | None  # None: nothing worth reusing (no image)
    prefix_len: int
    preamble_len: int  # leading ids shared with the empty prompt (0: too few to be worth reusing)
    params: SamplingParams
    seed: int | None
    generator: torch.Generator | None
    decoder: IncrementalDecoder
    out: list[int] = field(default_factory=list)


@dataclass
class CacheCounters:
    vision_hits: int = 0
    vision_misses: int = 0
    prefix_hits: int = 0
    prefix_misses: int = 0
    prefix_tokens_reused: int = 0  # image prefixes and preambles together
    preamble_hits: int = 0


MIN_PREAMBLE = 16  # shared leading tokens below which a request prefills from position 0
PREAMBLE = "preamble"  # the prefix cache's key for the shared start of every prompt


class UnderstandingBatch:
    def __init__(self, lm: LoadedModel, runner: ModelRunner, cache: KVCache, *, vision_cache_bytes: int,
                 prefix_cache_bytes: int, max_images: int, max_new_tokens: int) -> None:
        self.lm, self.runner, self.cache = lm, runner, cache
        self.vision: ByteLRU[torch.Tensor] = ByteLRU(vision_cache_bytes)  # image key -> features (N, D)
        self.prefixes: ByteLRU[CachedPrefix] = ByteLRU(prefix_cache_bytes)  # prefix key -> keys/values
        self.max_images, self.max_new_tokens = max_images, max_new_tokens
        self.counters = CacheCounters()
        self._preamble = build_understanding_inputs(lm, [], "").input_ids  # what every prompt starts with

    def prepare(self, request_id: str, images: Sequence[Image.Image], prompt: str, max_new_tokens: int,
                params: SamplingParams, *, messages: Sequence[Message] | None = None) -> Seq:
        """Validate and tokenize a request (raises `InvalidRequestError`); the sequence waits for a row.
        With `messages`, the whole conversation is the prompt and `images` are its images in order."""
        if len(images) > self.max_images:
            raise InvalidRequestError(f"{len(images)} images given; at most {self.max_images} per request")
        if max_new_tokens > self.max_new_tokens:
            raise InvalidRequestError(
                f"max_new_tokens {max_new_tokens} exceeds the limit of {self.max_new_tokens}")
        if messages is not None:
            inputs = build_conversation_inputs(self.lm, messages, images)
        else:
            inputs = build_understanding_inputs(self.lm, images, prompt)
        self._check_context(len(inputs.input_ids), max_new_tokens)
        keys = [image_key(p) for p in inputs.pixel_values] if inputs.pixel_values is not None else []
        prefix_len = _prefix_len(inputs.input_ids, self.lm.special["eoi"]) if keys else 0
        shared = _common_prefix_len(inputs.input_ids[:-1], self._preamble)  # at least one token is left to run
        seed = params.seed if params.seed is not None else (None if params.greedy else new_seed())
        state = UnderstandingState(
            ids=inputs.input_ids, pixels=inputs.pixel_values, image_keys=keys,
            prefix_key=(tuple(inputs.input_ids[:prefix_len]), tuple(keys)) if prefix_len else None,
            prefix_len=prefix_len,
            preamble_len=shared if shared >= MIN_PREAMBLE else 0,
            params=params, seed=seed,
            generator=make_generator(seed, self.lm.device) if seed is not None and not params.greedy else None,
            decoder=IncrementalDecoder(self.lm.tokenizer),
        )
        return Seq(request_id, "understand", num_rows=1, prompt_tokens=len(inputs.input_ids),
                   max_tokens=max_new_tokens, stop_token=self.lm.special["eos"], data=state)

    def _check_context(self, prompt_tokens: int, max_new_tokens: int) -> None:
        check_limits(self.lm, prompt_tokens, max_new_tokens)
        if prompt_tokens + max_new_tokens > self.cache.max_len:
            raise InvalidRequestError(
                f"prompt ({prompt_tokens} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the engine's "
                f"context length of {self.cache.max_len} tokens")

    def prefill(self, seq: Seq) -> int:
        """Fill the request's row (reusing a cached prefix when there is one); sample its first token."""
        state: UnderstandingState = seq.data
        row = seq.rows[0]
        cached = self.prefixes.get(state.prefix_key) if state.prefix_key is not None else None
        if cached is not None:
            self.counters.prefix_hits += 1
            self.counters.prefix_tokens_reused += cached.length
            self.cache.write(row, cached.k, cached.v)
            suffix = torch.tensor([state.ids[cached.length:]])  # (1, T - P): text only, after the last image
            hidden = self.runner.prefill(self.cache, [row], self.runner.embed_text(suffix), start=cached.length)
        else:
            if state.prefix_key is not None:
                self.counters.prefix_misses += 1
            embeds = self._embed_prompt(state)  # (1, T, D)
            # Every cached preamble is a prefix of the same ids (the empty prompt's), so one entry serves
            # all requests: each takes as many of its positions as it shares.
            # Both lengths are at least MIN_PREAMBLE (shorter ones are never looked up nor stored).
            preamble = self.prefixes.get(PREAMBLE) if state.preamble_len else None
            start = 0
            if preamble is not None:
                start = min(preamble.length, state.preamble_len)
                self.counters.preamble_hits += 1
                self.counters.prefix_tokens_reused += start
                self.cache.write(row, preamble.k[:, :, :start], preamble.v[:, :, :start])
            hidden = self.runner.prefill(self.cache, [row], embeds[:, start:], start=start)
            if state.prefix_key is not None:
                self._keep(state.prefix_key, row, state.prefix_len)
            if state.preamble_len > (preamble.length if preamble is not None else 0):
                self._keep(PREAMBLE, row, state.preamble_len)
        token = sample_rows(self.runner.text_logits(hidden), [state.params], [state.generator])[0]
        return token

    def _keep(self, key: Hashable, row: int, length: int) -> None:
        """Copy positions [0, length) of `row` into the prefix cache under `key`."""
        if self.prefixes.max_bytes > 0:
            prefix = CachedPrefix(*self.cache.read(row, length))
            self.prefixes.put(key, prefix, prefix.nbytes)

    def _embed_prompt(self, state: UnderstandingState) -> torch.Tensor:
        ids = torch.tensor([state.ids])  # (1, T)
        embeds = self.runner.embed_text(ids)  # (1, T, D)
        if state.pixels is None:
            return embeds
        features = self._features(state)  # (num_images * N, D)
        mask = (ids == self.lm.model.config.image_token_id).unsqueeze(-1).to(embeds.device)
        return embeds.masked_scatter(mask, features.to(embeds.dtype))

    def _features(self, state: UnderstandingState) -> torch.Tensor:
        found = [self.vision.get(k) for k in state.image_keys]
        missing = [i for i, f in enumerate(found) if f is None]
        self.counters.vision_hits += len(found) - len(missing)
        self.counters.vision_misses += len(missing)
        if missing:
            assert state.pixels is not None
            computed = self.runner.vision_features(state.pixels[missing])  # (M, N, D)
            for i, feats in zip(missing, computed, strict=True):
                found[i] = feats
                self.vision.put(state.image_keys[i], feats, feats.numel() * feats.element_size())
        return torch.cat([f for f in found if f is not None])  # (num_images * N, D)

    def push(self, seq: Seq, token: int) -> str:
        """Record a (non-stop) token; returns the newly settled text."""
        state: UnderstandingState = seq.data
        state.out.append(token)
        return state.decoder.push(token)

    def decode(self, seqs: list[Seq], width: int) -> list[int]:
        """One token for every running request; the step covers rows [0, width)."""
        ids = torch.zeros((width, 1), dtype=torch.long)
        positions = torch.zeros(width, dtype=torch.long)
        for seq in seqs:
            state: UnderstandingState = seq.data
            ids[seq.rows[0], 0] = state.out[-1]
            positions[seq.rows[0]] = len(state.ids) + len(state.out) - 1
        hidden = self.runner.decode(self.cache, self.runner.embed_text(ids), positions)  # (width, D)
        rows = torch.tensor([seq.rows[0] for seq in seqs], device=hidden.device)
        logits = self.runner.text_logits(hidden[rows])  # (B, V)
        return sample_rows(logits, [s.data.params for s in seqs], [s.data.generator for s in seqs])


def _prefix_len(ids: list[int], end_of_image: int) -> int:
    """Tokens up to and including the last image's end marker (0 when the prompt has no image)."""
    last = max((i for i, t in enumerate(ids) if t == end_of_image), default=-1)
    return last + 1 if 0 < last + 1 < len(ids) else 0


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
