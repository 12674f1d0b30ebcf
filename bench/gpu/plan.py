"""The dry estimate: how long each section of the GPU check should take, before anything runs.

Facts per shape come from the model built on the meta device (no memory, no weights): parameter
count, the weight bytes a decode step reads, KV bytes per token. The cost model is deliberately
simple: a decode step costs the larger of its launch/Python overhead (per layer, eager or
compiled) and its memory traffic (weights + KV over the measured copy bandwidth), plus its FLOPs;
compiling a bucket costs a fixed guess. The constants are guesses for an H100-class GPU (and
this project's 2-core CPU box); the report prints actual seconds next to each estimate so the next
run can correct them. This module knows arithmetic, not the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import JanusForConditionalGeneration

from bench.gpu.model import shape_janus_config
from bench.models import lm_weight_bytes
from janus_core.tiny.janus import build_tokenizer

BENCH_PROMPT_TOKENS = 30  # generation prompts of the bench, chat format included
UND_PROMPT_TOKENS = 100  # understanding prompt text around the image tokens


@dataclass(frozen=True)
class Costs:
    layer_overhead_ms: dict[str, float]  # per layer per step: kernel launches and Python
    step_fixed_ms: float  # per step outside the layers: embedding, heads, sampling, scheduling
    per_request_ms: float  # per running request per step: bookkeeping in Python
    flops: float  # dense matmul rate the LM reaches
    compile_s: float  # torch.compile of one batch bucket's static step
    capture_s: float  # CUDA-graph capture of one batch bucket (its flex kernel compiled first)
    init_bytes_per_s: float  # random init: weights written (twice: init and noise)
    image_s: float  # SigLIP encode or VQ decode of one 384 px image


COSTS = {
    "cuda": Costs({"eager": 0.30, "graphs": 0.01, "compile": 0.03, "compile-graphs": 0.005}, 1.5, 0.03, 300e12,
                  60.0, 10.0, 40e9, 0.01),
    "cpu": Costs({"eager": 0.25, "graphs": 0.25, "compile": 0.25, "compile-graphs": 0.25}, 1.0, 0.05, 60e9, 0.0,
                 0.0, 1e9, 0.5),
}


@dataclass(frozen=True)
class ShapeFacts:
    params: int
    lm_params: int
    layers: int
    gen_weight_bytes: int
    text_weight_bytes: int
    kv_per_token: int
    image_tokens: int
    image_size: int


def shape_facts(shape: str, dtype: torch.dtype) -> ShapeFacts:
    config = shape_janus_config(shape, build_tokenizer())
    with torch.device("meta"):
        model = JanusForConditionalGeneration(config)
    core = model.model.language_model
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    size = dtype.itemsize

    def count(*modules: torch.nn.Module) -> int:
        return sum(p.numel() for m in modules for p in m.parameters())

    return ShapeFacts(
        params=count(model), lm_params=count(core.layers), layers=text.num_hidden_layers,
        gen_weight_bytes=lm_weight_bytes(model) // 4 * size,  # meta parameters are fp32
        text_weight_bytes=count(core.layers, core.norm, model.lm_head) * size,
        kv_per_token=2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * size,
        image_tokens=config.vision_config.num_image_tokens, image_size=config.vision_config.image_size,
    )


class Estimator:
    def __init__(self, device: str, bandwidth: float) -> None:
        self.costs = COSTS["cuda" if device == "cuda" else "cpu"]
        self.bandwidth = bandwidth

    def step_s(self, f: ShapeFacts, weight_bytes: int, rows: int, positions: float, requests: int,
               mode: str = "eager") -> float:
        c = self.costs
        overhead = (f.layers * c.layer_overhead_ms[mode] + c.step_fixed_ms + c.per_request_ms * requests) / 1000
        memory = (weight_bytes + rows * positions * f.kv_per_token) / self.bandwidth
        return max(overhead, memory) + 2 * f.lm_params * rows / c.flops

    def prefill_s(self, f: ShapeFacts, tokens: int) -> float:
        return 2 * f.lm_params * tokens / self.costs.flops + f.layers * self.costs.layer_overhead_ms["eager"] / 1000

    def image_s(self, f: ShapeFacts) -> float:
        return self.costs.image_s * (f.image_size / 384) ** 2

    def setup(self, f: ShapeFacts, dtype_bytes: int, copies: int) -> float:
        return 1.0 + copies * 2 * f.params * dtype_bytes / self.costs.init_bytes_per_s

    def gen_step(self, f: ShapeFacts, c: int, mode: str) -> float:
        positions = BENCH_PROMPT_TOKENS + f.image_tokens / 2
        return self.step_s(f, f.gen_weight_bytes, 2 * c, positions, c, mode)

    def generation(self, f: ShapeFacts, levels: list[int], mode: str) -> float:
        total = 0.0
        for c in levels:
            step = self.gen_step(f, c, mode)
            prefill = c * self.prefill_s(f, 2 * BENCH_PROMPT_TOKENS)
            once = (self.costs.compile_s if mode.startswith("compile") else 0.0) + \
                (self.costs.capture_s if mode.endswith("graphs") else 0.0)
            total += once + 2 * prefill + (4 + f.image_tokens) * step + c * self.image_s(f)
        return total

    def und_prompt(self, f: ShapeFacts) -> int:
        return f.image_tokens + UND_PROMPT_TOKENS

    def understanding(self, f: ShapeFacts, levels: list[int], new_tokens: int) -> float:
        prompt = self.und_prompt(f)
        total = self.image_s(f) + self.prefill_s(f, prompt)  # warm-up request
        for c in levels:
            step = self.step_s(f, f.text_weight_bytes, c, prompt + new_tokens / 2, c)
            total += c * (self.image_s(f) + self.prefill_s(f, prompt)) + new_tokens * step
        return total

    def hf_image(self, f: ShapeFacts) -> float:
        return 1.5 * f.image_tokens * self.gen_step(f, 1, "eager")  # its loop rebuilds masks and processors

    def hf_text(self, f: ShapeFacts, new_tokens: int) -> float:
        prompt = self.und_prompt(f)
        step = self.step_s(f, f.text_weight_bytes, 1, prompt + new_tokens / 2, 1)
        return self.image_s(f) + self.prefill_s(f, prompt) + 1.3 * new_tokens * step

    def check_understanding(self, f: ShapeFacts, new_tokens: int) -> float:
        prompt = self.und_prompt(f)
        ours = 3 * (self.image_s(f) + self.prefill_s(f, prompt))
        return ours + new_tokens * self.step_s(f, f.text_weight_bytes, 3, prompt, 3) + 3 * self.hf_text(f, new_tokens)

    def check_generation(self, f: ShapeFacts, images: int) -> float:
        return f.image_tokens * self.gen_step(f, images, "eager") + images * self.hf_image(f)
