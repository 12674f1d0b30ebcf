"""Continuously batched understanding: requests join and leave the decode batch at every token.

Each request owns one row of paged KV (a block table). Admission prefills the positions its table
does not already hold; after that a decode step feeds every running request's last token at its
own position. Two caches save work:
- vision features by image content (a `ByteLRU` keyed by `image_key`): a repeated image skips SigLIP;
- KV blocks by content: every full block of a row (prompt and answer alike) gets a chained key over
  its token ids and the images whose positions it holds, and stays in the pool after the request
  ends until the memory is needed. A later prompt that starts with the same tokens and images (the
  system prompt, the same image and another question, the next turn of a conversation, a preempted
  request coming back) takes those blocks by reference and prefills only the rest.

This module knows the understanding prompt format and limits; the scheduler decides who runs and holds
which blocks, the runner does the tensor work, and the engine's output processor turns tokens into text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from janus_core.attention.paged import PagedKV, PrefillBatch
from janus_core.errors import InvalidRequestError
from janus_core.models.loader import LoadedModel
from janus_core.requests import UnderstandRequest
from janus_core.sampling.params import SamplingParams, request_seed
from janus_core.sampling.sampler import RowSampling, sample, stream_uniforms
from janus_core.sched.block_pool import chain_keys
from janus_core.sched.kv_manager import KVManager
from janus_core.sched.sequence import TEXT
from janus_core.sched.sequence import Sequence as Seq
from janus_core.simple.understand import check_limits
from janus_core.step.batch import Foreground, StepOutput
from janus_core.step.lru import ByteLRU
from janus_core.step.rows import DecodeRows, RowValues
from janus_core.step.runner import ModelRunner
from janus_core.step.vision_cache import image_key
from janus_core.text.processor import build_conversation_inputs, build_text_inputs, build_understanding_inputs

Span = tuple[int, int, str]  # positions [start, end) of one image's placeholders, and its content key


@dataclass(eq=False)
class UnderstandingState:
    ids: list[int]
    pixels: torch.Tensor | None  # (num_images, 3, H, W)
    image_keys: list[str]
    spans: list[Span]
    params: SamplingParams
    seed: int | None
    uniforms: torch.Tensor  # (1, max_new_tokens) float64: the stream of `seed`; (1, 1) if greedy
    stop: list[str] = field(default_factory=list)  # stop strings (the output processor watches the text)
    out: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return self.ids + self.out


@dataclass
class CacheCounters:
    vision_hits: int = 0
    vision_misses: int = 0
    prefix_hits: int = 0  # admissions that found KV blocks in the cache
    prefix_misses: int = 0
    prefix_tokens_reused: int = 0


def image_spans(ids: Sequence[int], image_token: int, keys: Sequence[str]) -> list[Span]:
    """The placeholder runs of `ids`, in order, paired with the images' content keys."""
    spans: list[Span] = []
    start = None
    for i, t in enumerate([*ids, -1]):
        if t == image_token and start is None:
            start = i
        elif t != image_token and start is not None:
            spans.append((start, i, keys[len(spans)]))
            start = None
    if len(spans) != len(keys):
        raise ValueError(f"{len(spans)} image placeholder runs for {len(keys)} images")
    return spans


class TextBatch(Foreground):
    kind = "understand"

    def __init__(self, lm: LoadedModel, runner: ModelRunner, kv: PagedKV, manager: KVManager, *,
                 vision_cache_bytes: int, max_images: int, max_new_tokens: int, max_context: int,
                 max_running: int) -> None:
        self.lm, self.runner, self.kv, self.manager = lm, runner, kv, manager
        self.vision: ByteLRU[torch.Tensor] = ByteLRU(vision_cache_bytes)  # image key -> features (N, D)
        self.max_images, self.max_new_tokens, self.max_context = max_images, max_new_tokens, max_context
        self.counters = CacheCounters()
        self.vocab = int(lm.model.config.text_config.vocab_size)
        self.rows = DecodeRows(max_running, max_new_tokens, lm.device, vocab=self.vocab, eos=lm.special["eos"])

    def prepare(self, request: UnderstandRequest) -> Seq:
        """Validate and tokenize a request (raises `InvalidRequestError`); the sequence waits for blocks.
        With `messages`, the whole conversation is the prompt and `images` are its images in order; `raw`
        (a plain completion): `prompt`, or `prompt_ids`, is the whole prompt, no chat format, no images."""
        images, prompt, max_new_tokens, params = request.images, request.prompt, request.max_new_tokens, request.params
        raw, prompt_ids, messages = request.raw, request.prompt_ids, request.messages
        if len(images) > self.max_images:
            raise InvalidRequestError(f"{len(images)} images given; at most {self.max_images} per request")
        if max_new_tokens > self.max_new_tokens:
            raise InvalidRequestError(
                f"max_new_tokens {max_new_tokens} exceeds the limit of {self.max_new_tokens}")
        if params.min_tokens > max_new_tokens:
            raise InvalidRequestError(f"min_tokens ({params.min_tokens}) exceeds max_new_tokens ({max_new_tokens})")
        if raw or prompt_ids is not None:
            if images:
                raise InvalidRequestError("a plain completion takes no images")
            inputs = build_text_inputs(self.lm, prompt, prompt_ids)
        elif messages is not None:
            inputs = build_conversation_inputs(self.lm, messages, images)
        else:
            inputs = build_understanding_inputs(self.lm, images, prompt)
        self._check_context(len(inputs.input_ids), max_new_tokens)
        keys = [image_key(p) for p in inputs.pixel_values] if inputs.pixel_values is not None else []
        spans = image_spans(inputs.input_ids, self.lm.special["image"], keys)
        if self.lm.image_lead:  # features that start before the placeholders (JanusFlow: its begin-of-image)
            spans = [(a - self.lm.image_lead, b, key) for a, b, key in spans]
        seed = request_seed(params, draws=not params.greedy)
        state = UnderstandingState(
            ids=inputs.input_ids, pixels=inputs.pixel_values, image_keys=keys, spans=spans, params=params, seed=seed,
            uniforms=stream_uniforms(seed if seed is not None else 0, 1 if params.greedy else max_new_tokens)[None],
            stop=list(request.stop),
        )
        return Seq(request.request_id, "understand", prompt_tokens=len(inputs.input_ids), max_steps=max_new_tokens,
                   stop_token=None if params.ignore_eos else self.lm.special["eos"], data=state,
                   cache_keys=chain_keys(state.ids, self.kv.block_size, spans), layout=TEXT)

    def _check_context(self, prompt_tokens: int, max_new_tokens: int) -> None:
        check_limits(self.lm, prompt_tokens, max_new_tokens)
        if prompt_tokens + max_new_tokens > self.max_context:
            raise InvalidRequestError(
                f"prompt ({prompt_tokens} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the engine's "
                f"context length of {self.max_context} tokens")

    def prefill(self, seq: Seq) -> torch.Tensor:
        """Compute the positions the row's table does not hold yet (all but cached blocks); sample a token (1,).

        A preempted request comes back through here: its prompt and every token it had sampled are its
        new prompt, and the token sampled now is the one its next decode step would have given.
        """
        state: UnderstandingState = seq.data
        tokens, start = state.tokens, seq.cached_tokens
        if start:
            self.counters.prefix_hits += 1
            self.counters.prefix_tokens_reused += start
        else:
            self.counters.prefix_misses += 1
        batch = PrefillBatch.for_rows(self.kv, seq.tables, start, len(tokens))
        hidden = self.runner.prefill(batch, self._embed(state, start, len(tokens)), start)
        self._extend_keys(seq, len(tokens))
        rows = RowSampling.of([state.params], state.uniforms[:, min(len(state.out), state.uniforms.shape[1] - 1)],
                              hidden.device, produced=[len(state.out)], history=[tokens], vocab=self.vocab,
                              eos=self.lm.special["eos"])
        return sample(self.runner.text_logits(hidden), rows)

    def _embed(self, state: UnderstandingState, start: int, end: int) -> torch.Tensor:
        """Embeddings of positions [start, end): text, with SigLIP features over the images' placeholders."""
        embeds = self.runner.embed_text(torch.tensor([state.tokens[start:end]]))  # (1, T, D)
        wanted = [i for i, (a, b, _) in enumerate(state.spans) if a < end and b > start]
        if not wanted:
            return embeds
        embeds = embeds.clone()
        # By span, not by token id: an answer may contain the placeholder id as plain text (a preempted
        # request's answer is part of its prompt when it comes back).
        for i, feats in zip(wanted, self._features(state, wanted), strict=True):
            a, b, _ = state.spans[i]
            lo, hi = max(a, start), min(b, end)
            embeds[0, lo - start:hi - start] = feats[lo - a:hi - a].to(embeds.dtype)
        return embeds

    def _features(self, state: UnderstandingState, wanted: list[int]) -> list[torch.Tensor]:
        found = {i: self.vision.get(state.image_keys[i]) for i in wanted}
        missing = [i for i, f in found.items() if f is None]
        self.counters.vision_hits += len(wanted) - len(missing)
        self.counters.vision_misses += len(missing)
        if missing:
            assert state.pixels is not None
            computed = self.runner.vision_features(state.pixels[missing])  # (M, N, D)
            for i, feats in zip(missing, computed, strict=True):
                found[i] = feats
                self.vision.put(state.image_keys[i], feats, feats.numel() * feats.element_size())
        return [found[i] for i in wanted]  # type: ignore[misc]

    def _extend_keys(self, seq: Seq, fed: int) -> None:
        """Key the blocks that `fed` written positions have filled, and offer them to the content cache."""
        state: UnderstandingState = seq.data
        bs = self.kv.block_size
        if fed // bs > len(seq.cache_keys):
            prev = seq.cache_keys[-1] if seq.cache_keys else None
            seq.cache_keys += chain_keys(state.tokens[:fed], bs, state.spans, prev=prev, first=len(seq.cache_keys))
        self.manager.register(seq)

    def launch(self, seqs: list[Seq]) -> torch.Tensor:
        """Queue one token for every running request (each feeds its last token at its next position);
        returns the chosen tokens (B,) on the device. Inputs come from the preallocated rows."""
        rows = self.rows
        rows.sync(seqs, lambda seq: 1, self._values)
        count = rows.count
        positions = rows.host_position[:count].tolist()
        logits = self.runner.decode_logits(self.kv, "text", [s.tables[0] for s in seqs], positions,
                                           rows.last[:count], rows.position[:count])  # (B, V)
        for seq, p in zip(seqs, positions, strict=True):
            self._extend_keys(seq, p + 1)
        chosen = sample(logits, rows.sampling())
        rows.advance(chosen)
        return chosen

    def update(self, seqs: list[Seq], chosen: list[int] | None) -> list[StepOutput]:
        """Record each row's token in its answer (a stop token ends it without being part of it)."""
        assert chosen is not None
        outputs = []
        for seq, token in zip(seqs, chosen, strict=True):
            state: UnderstandingState = seq.data
            if token != seq.stop_token:
                state.out.append(token)
            outputs.append(StepOutput(seq, token, len(state.out), seq.max_steps))
        return outputs

    def reset(self) -> None:
        """Forget the row state (after a failed step): the next `launch` writes every row afresh."""
        self.rows.reset()

    def clear_caches(self) -> None:
        self.vision.clear()

    @staticmethod
    def _values(seq: Seq) -> RowValues:
        state: UnderstandingState = seq.data
        p = state.params
        return RowValues(last=torch.tensor([state.out[-1]]), position=len(state.ids) + len(state.out) - 1,
                         step=len(state.out), temperature=p.temperature, top_p=p.top_p, greedy=p.greedy,
                         uniforms=state.uniforms, top_k=p.top_k, min_p=p.min_p, penalty=p.repetition_penalty,
                         min_tokens=p.min_tokens,
                         history=torch.tensor(state.tokens) if p.repetition_penalty != 1.0 else None)
