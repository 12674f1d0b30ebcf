"""The model runner: batched tensor work on the Janus LM over the paged KV cache, nothing else.

It embeds tokens (text or image codes), runs the Llama layers of transformers' model with our
attention function (`janus_core.attention.paged`: keys and values written into and read from the block
pool in place) selected for the LM, and applies the text or image head. Rows of different lengths
share a decode step: each row has its own position and its own blocks, so nothing is padded; with
`compile`, decode steps over flex attention run as one compiled static function per power-of-two
bucket of rows (`janus_core.step.static`), padded to the bucket; with `cuda_graphs`, that static step
(compiled or not) is captured once per bucket as a CUDA graph and replayed (`janus_core.step.graphs`).
On CPU in fp32 the runner swaps the model's linear layers for oneDNN-packed ones
(`janus_core.step.packed_linear`), in place, unless told not to.

The runner knows tensors, slots and positions; not requests, prompts, text or scheduling.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from janus_core.attention.flex import bucket, flex_kernel, room_for_graphs
from janus_core.attention.paged import ATTENTION, DecodeBatch, PagedKV, PrefillBatch
from janus_core.models.compat import unwrap_hub_kernels
from janus_core.models.device import measure_peak
from janus_core.models.loader import LoadedModel
from janus_core.step.graphs import Capturing, StepGraphs
from janus_core.step.packed_linear import pack_linears, packing_supported
from janus_core.step.static import StaticDecode, tables_to_tensors

log = logging.getLogger(__name__)

# Compiled graphs one code object may hold: both heads' static steps are `StaticDecode.step`, compiled once
# per (head, bucket) and engine; 16 sequences give 5 text and 6 image buckets, beyond dynamo's default 8.
STATIC_GRAPHS = 64


class ModelRunner:
    def __init__(self, lm: LoadedModel, *, compile: bool = False, cuda_graphs: bool = False,
                 pack_cpu_linears: bool = True, compile_backend: str = "inductor") -> None:
        self.lm = lm
        self.compile, self.compile_backend, self.cuda_graphs = compile, compile_backend, cuda_graphs
        self._static: dict[str, object] = {}  # head -> the static decode step (compiled with `compile`)
        self._graphs: dict[str, StepGraphs] = {}  # head -> its captured steps (with `cuda_graphs`)
        self._capturing: Capturing | None = None  # the heads' shared graph memory pool and streams (CUDA)
        self.scratch_slot: int | None = None  # set by the pool's owner for the static step: padding rows write there
        self.row_blocks: dict[str, int] = {}  # head -> block-table width of the static step (the longest row's blocks)
        if cuda_graphs and lm.device.type != "cuda":
            log.info("no CUDA: the graphed decode step runs on its static buffers without capturing a graph")
        if pack_cpu_linears and packing_supported(lm.device, lm.dtype):
            log.info("packed %d linear layers for oneDNN", pack_linears(lm.model))
        self.model = lm.model
        unwrap_hub_kernels(lm.model)  # no hub kernels here; their wrappers would make compiled steps recompile
        self.core = lm.model.model.language_model  # transformers' LlamaModel
        text = self.core.config  # the LM's own config: its layers read the attention function from it
        if text.num_attention_heads != text.num_key_value_heads:
            raise ValueError("the paged KV cache needs as many KV heads as attention heads "
                             f"({text.num_key_value_heads} vs {text.num_attention_heads})")
        text._attn_implementation = ATTENTION  # plain SDPA unless a call brings its paged batch

    # --- cache ------------------------------------------------------------------------------------
    def new_kv(self, num_blocks: int, block_size: int) -> PagedKV:
        cfg = self.model.config.text_config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return PagedKV(layers=cfg.num_hidden_layers, kv_heads=cfg.num_key_value_heads, num_blocks=num_blocks,
                       block_size=block_size, head_dim=head_dim, dtype=self.lm.dtype, device=self.lm.device)

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
    def layers(self, embeds: torch.Tensor, positions: torch.Tensor, batch) -> torch.Tensor:
        """transformers' Llama layers over `embeds` (B, T, D) at `positions` (B, T), attending with `batch`
        (`janus_core.attention.paged`'s prefill or decode batch, or any object with its `attend`)."""
        cos_sin = self.core.rotary_emb(embeds, position_ids=positions)
        hidden = embeds
        for layer in self.core.layers:
            hidden = layer(hidden, attention_mask=None, position_embeddings=cos_sin, janus_kv=batch)
        return self.core.norm(hidden)  # (B, T, D)

    @torch.inference_mode()
    def prefill(self, batch: PrefillBatch, embeds: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Run `embeds` (B, T, D) at positions [start, start + T) of `batch`'s rows; return the last hidden (B, D)."""
        rows, length = embeds.shape[:2]
        positions = torch.arange(start, start + length, device=embeds.device).expand(rows, length)
        return self.layers(embeds, positions, batch)[:, -1, :]

    @torch.inference_mode()
    def decode(self, batch: DecodeBatch, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One step: row b feeds `embeds[b]` (1, D) at `positions[b]`; returns hidden (B, D)."""
        return self.layers(embeds, positions.to(embeds.device)[:, None], batch)[:, -1, :]

    @torch.inference_mode()
    def decode_logits(self, kv: PagedKV, head: str, tables: Sequence[Sequence[int]], positions: list[int],
                      ids: torch.Tensor, position_t: torch.Tensor) -> torch.Tensor:
        """One decode step to the `head` ("text" or "image") logits (R, V): row r feeds `ids[r]` at
        `positions[r]` (the same on the device: `position_t`) with block table `tables[r]`.

        With `compile` or `cuda_graphs` and flex attention: the static step (`janus_core.step.static`),
        padded to the power-of-two bucket of rows, compiled once per bucket with `compile` and replayed as
        that bucket's CUDA graph with `cuda_graphs`; otherwise the eager paged step.
        """
        if not (self.compile or self.cuda_graphs) or kv.attention != "flex" or self.scratch_slot is None:
            embed = self.embed_text if head == "text" else self.embed_image_tokens
            hidden = self.decode(DecodeBatch.for_rows(kv, tables, positions), embed(ids[:, None]), position_t)
            return self.text_logits(hidden) if head == "text" else self.image_logits(hidden)
        rows = len(tables)
        args = self._static_args(kv, head, tables, positions, ids)
        if self.cuda_graphs:
            return self._graphs_of(kv, head).run(args)[:rows]
        return self._static_step(kv, head)(**args)[:rows]

    def _static_args(self, kv: PagedKV, head: str, tables: Sequence[Sequence[int]], positions: list[int],
                     ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The static step's arguments: `ids` and the rows' tables, padded to their bucket."""
        padded = bucket(len(tables))
        return {"ids": torch.cat([ids, ids.new_zeros(padded - len(tables))]),
                **tables_to_tensors(kv, tables, positions, padded, self.scratch_slot, self.row_blocks.get(head, 1))}

    def _graphs_of(self, kv: PagedKV, head: str) -> StepGraphs:
        graphs = self._graphs.get(head)
        if graphs is None:
            if self._capturing is None and kv.device.type == "cuda":
                self._capturing = Capturing(kv.device)
            graphs = self._graphs[head] = StepGraphs(self._static_step(kv, head), kv.device, self._capturing)
        return graphs

    def _static_step(self, kv: PagedKV, head: str):
        step = self._static.get(head)
        if step is None:
            if self.compile:
                room_for_graphs(STATIC_GRAPHS)
                step = torch.compile(StaticDecode(self, kv, head).step, fullgraph=True, dynamic=False,
                                     backend=self.compile_backend)
            else:  # eager layers around the compiled flex kernel (on CUDA), for a graph to capture
                step = StaticDecode(self, kv, head, flex=flex_kernel(kv.device.type == "cuda")).step
            self._static[head] = step
        return step

    @torch.inference_mode()
    def profile_peak(self, tokens: int, rows: int) -> int:
        """Bytes above the weights that a `tokens`-long prefill and a `rows`-row step's logits take (CUDA)."""

        def run() -> None:
            embeds = torch.zeros((1, tokens, self.model.config.text_config.hidden_size), dtype=self.lm.dtype,
                                 device=self.lm.device)
            hidden = self.core(inputs_embeds=embeds, use_cache=False).last_hidden_state[:, -1]
            self.text_logits(hidden.expand(rows, -1))
            self.image_logits(hidden.expand(rows, -1))

        return measure_peak(self.lm.device, run)

    def warm_up(self, kv: PagedKV, max_batch_size: int) -> None:
        """Compile (and capture) for every batch bucket before requests arrive: on CUDA the flex decode
        attention; with `compile` (on any device) the static decode step of each head; with `cuda_graphs`
        each head's step captured per bucket, largest first, all in one memory pool. So serving never compiles
        or captures.

        What cannot be done on this torch/driver is logged and dropped: the graphs (the step runs without
        them), the compiled step (the eager one), or the flex kernel (the per-row attention).
        """
        on_cuda = self.lm.device.type == "cuda"
        static = (self.compile or self.cuda_graphs) and self.scratch_slot is not None  # as decode_logits decides
        if kv.attention != "flex" or not (on_cuda or static):
            return
        started = time.perf_counter()
        buckets = [1 << i for i in range((2 * max_batch_size - 1).bit_length() + 1)]  # up to 2 x max rows (CFG)
        try:
            for rows in reversed(buckets) if self.cuda_graphs else buckets:
                ids, positions = torch.zeros(rows, dtype=torch.long), torch.zeros(rows, dtype=torch.long)
                if static:  # block 0 is free: scratch for the warm-up
                    for head in ("text", "image") if rows <= bucket(max_batch_size) else ("image",):
                        if self.cuda_graphs:  # a capture that fails here drops every graph (below)
                            with torch.inference_mode():
                                args = self._static_args(kv, head, [[0]] * rows, [0] * rows, ids.to(kv.device))
                                self._graphs_of(kv, head).capture(args)
                        else:
                            self.decode_logits(kv, head, [[0]] * rows, [0] * rows, ids.to(kv.device), positions)
                else:
                    batch = DecodeBatch.for_rows(kv, [[0]] * rows, [0] * rows)
                    self.decode(batch, self.embed_text(ids[:, None]), positions)
            if on_cuda:
                torch.cuda.synchronize(self.lm.device)
            done = "captured" if self.cuda_graphs else "compiled"
            what = "static decode step" if static else "flex decode attention"
            log.info("%s the %s for batches up to %d rows in %.1f s", done, what, buckets[-1],
                     time.perf_counter() - started)
        except Exception:
            if self.cuda_graphs:
                log.exception("capturing the decode step as CUDA graphs failed; decoding without graphs")
                self.cuda_graphs = False
                self._graphs.clear()
                self._capturing = None
                self.warm_up(kv, max_batch_size)
            elif self.compile:
                log.exception("the static decode step failed to compile; decoding eager instead")
                self.compile = False
            else:
                log.exception("flex decode attention failed to compile; using per-row attention instead")
                kv.attention = "runs"
