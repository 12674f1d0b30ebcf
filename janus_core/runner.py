"""The model runner: batched tensor work on the Janus LM over a static KV cache, nothing else.

It embeds tokens (text or image codes), runs the Llama layers of transformers' model with our
`KVCache` views standing in for transformers' cache, applies the text or image head, and samples.
Rows of different lengths share a decode step through per-row positions and a key mask.

With `compile=True` on CUDA the decode step runs with static shapes (batch padded to a bucket,
keys over the whole cache, an explicit mask) under `torch.compile(mode="reduce-overhead")`, which
captures CUDA graphs; `warm_up` compiles every bucket before requests arrive. On CPU the flag is
ignored (eager is faster there and the oracle tests run eager). On CPU in fp32 the runner swaps the
model's linear layers for oneDNN-packed ones (`janus_core.packed_linear`), in place, unless told not to.

The runner knows tensors, rows and positions; not requests, prompts, text or scheduling.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from janus_core.kv_cache import DecodeView, KVCache, PrefillView
from janus_core.loading import LoadedModel
from janus_core.packed_linear import pack_linears, packing_supported
from janus_core.sampling import SamplingParams, sample_row

log = logging.getLogger(__name__)


def batch_buckets(max_rows: int) -> list[int]:
    """Padded batch sizes for the compiled decode step: powers of two, then `max_rows`."""
    sizes, size = [], 1
    while size < max_rows:
        sizes.append(size)
        size *= 2
    return [*sizes, max_rows]


class ModelRunner:
    def __init__(self, lm: LoadedModel, *, compile: bool = False, pack_cpu_linears: bool = True) -> None:
        self.lm = lm
        if pack_cpu_linears and packing_supported(lm.device, lm.dtype):
            log.info("packed %d linear layers for oneDNN", pack_linears(lm.model))
        self.model = lm.model
        self.core = lm.model.model.language_model  # transformers' LlamaModel
        self.compiled = compile and lm.device.type == "cuda"
        if compile and not self.compiled:
            log.warning("compile=True needs CUDA; running the eager decode step on %s", lm.device)
        self._static_decode: Callable[..., torch.Tensor] | None = None
        if self.compiled:
            self._static_decode = torch.compile(self._decode_static, mode="reduce-overhead", dynamic=False)

    # --- cache ------------------------------------------------------------------------------------
    def new_cache(self, rows: int, max_len: int) -> KVCache:
        cfg = self.model.config.text_config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        cache = KVCache(layers=cfg.num_hidden_layers, rows=rows, kv_heads=cfg.num_key_value_heads,
                        max_len=max_len, head_dim=head_dim, dtype=self.lm.dtype, device=self.lm.device)
        if self.compiled:  # in-place writes to fixed addresses are what CUDA graphs can replay
            torch._dynamo.mark_static_address(cache.k)
            torch._dynamo.mark_static_address(cache.v)
        return cache

    # --- embeddings and heads ---------------------------------------------------------------------
    @torch.inference_mode()
    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids.to(self.lm.device))  # (B, T) -> (B, T, D)

    @torch.inference_mode()
    def embed_image_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.prepare_embeddings_for_image_generation(ids.to(self.lm.device))  # (B, T, D)

    @torch.inference_mode()
    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()  # (B, D) -> (B, V_text)

    @torch.inference_mode()
    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.model.generation_head(hidden).float()  # (B, D) -> (B, V_image)

    @torch.inference_mode()
    def vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Aligned SigLIP features: (N_img, 3, H, W) -> (N_img, num_image_tokens, D)."""
        return self.model.model.get_image_features(pixels.to(self.lm.device, self.lm.dtype)).pooler_output

    # --- forward passes ---------------------------------------------------------------------------
    def _layers(self, embeds: torch.Tensor, positions: torch.Tensor, view, mask: torch.Tensor | None):
        # embeds (B, T, D); positions (B, T); mask (B, 1, T, K) bool (True = attend) or None (causal)
        cos_sin = self.core.rotary_emb(embeds, position_ids=positions)
        hidden = embeds
        for layer in self.core.layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=cos_sin, past_key_values=view)
        return self.core.norm(hidden)  # (B, T, D)

    @torch.inference_mode()
    def prefill(self, cache: KVCache, rows: list[int], embeds: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Run `embeds` (B, T, D) at positions [start, start + T) of `rows`; return the last hidden (B, D).

        Positions [0, start) of those rows must already hold a prefix (see `KVCache.write`).
        """
        batch, length = embeds.shape[:2]
        positions = torch.arange(start, start + length, device=embeds.device).expand(batch, length)
        mask = None  # from position 0, SDPA's own causal mask is exactly what the reference uses
        if start:
            keys = torch.arange(start + length, device=embeds.device)
            mask = (keys[None, :] <= positions[0, :, None]).expand(batch, 1, length, start + length)
        view = PrefillView(cache, rows, start)
        return self._layers(embeds, positions, view, mask)[:, -1, :]

    @torch.inference_mode()
    def decode(self, cache: KVCache, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One step for rows [0, B): row b feeds `embeds[b]` (1, D) at `positions[b]`; returns hidden (B, D).

        Free rows inside [0, B) take any embedding at position 0; their output is ignored.
        """
        if self._static_decode is not None:
            return self._decode_padded(cache, embeds, positions)
        positions = positions.to(embeds.device)
        top = int(positions.max())
        mask = None
        if int(positions.min()) != top:
            keys = torch.arange(top + 1, device=embeds.device)
            mask = (keys[None, :] <= positions[:, None])[:, None, None, :]  # (B, 1, 1, top + 1)
        view = DecodeView(cache, positions, top + 1)
        return self._layers(embeds, positions[:, None], view, mask)[:, -1, :]

    def _decode_padded(self, cache: KVCache, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        batch = embeds.shape[0]
        padded = next(b for b in batch_buckets(cache.rows) if b >= batch)
        emb = torch.zeros((padded, 1, embeds.shape[-1]), dtype=embeds.dtype, device=embeds.device)
        emb[:batch] = embeds
        pos = torch.zeros(padded, dtype=torch.long, device=embeds.device)
        pos[:batch] = positions.to(embeds.device)
        assert self._static_decode is not None
        return self._static_decode(cache, emb, pos)[:batch].clone()

    def _decode_static(self, cache: KVCache, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # Static shapes: (B_bucket, 1, D) in, keys over the whole cache, mask always present.
        keys = torch.arange(cache.max_len, device=embeds.device)
        mask = (keys[None, :] <= positions[:, None])[:, None, None, :]  # (B, 1, 1, S)
        view = DecodeView(cache, positions, cache.max_len)
        return self._layers(embeds, positions[:, None], view, mask)[:, -1, :]

    @torch.inference_mode()
    def warm_up(self, cache: KVCache, embed: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Compile (and capture) the decode step for every batch bucket of `cache`; no-op when eager."""
        if self._static_decode is None:
            return
        for batch in batch_buckets(cache.rows):
            ids = torch.zeros((batch, 1), dtype=torch.long, device=self.lm.device)
            for _ in range(3):  # reduce-overhead records the graph on a later call
                self.decode(cache, embed(ids), torch.zeros(batch, dtype=torch.long))
        torch.cuda.synchronize()


def sample_rows(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> list[int]:
    """One token per row of `logits` (B, V), each with its own parameters and generator."""
    greedy = torch.argmax(logits, dim=-1).tolist()  # one batched call covers every greedy row
    return [greedy[i] if p.greedy else sample_row(logits[i], p, generators[i]) for i, p in enumerate(params)]
