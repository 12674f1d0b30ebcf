"""The reference implementations the benchmarks compare against, and the timing helpers they share.

- `hf_generate_image`: transformers' `JanusForConditionalGeneration.generate(generation_mode="image")`,
  one request at a time (its own static cache and CFG logits processor).
- `official_loop`: the loop style of DeepSeek's Janus `generate.py`: one prompt, `parallel_size`
  images, cond/uncond rows all prefilled, a dynamic cache, CFG and sampling in plain torch.
- `hf_understand`: transformers' `generate` for text, one request at a time, with time to first token.

Nothing here imports the engine, so a REST-level benchmark can reuse it unchanged. Every reference
refuses a model whose linear layers the engine has packed (`require_stock`): those figures would be
ours, not transformers'.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import DynamicCache
from transformers.generation.streamers import BaseStreamer

from janus_core.models.compat import cache_arg
from janus_core.models.loader import LoadedModel
from janus_core.step.packed_linear import PackedLinear
from janus_core.text.processor import build_generation_ids, build_understanding_inputs, unconditional_ids

# The generation prompts the benches cycle through (the same everywhere, so figures compare).
PROMPTS = ["a photo of a mountain lake at sunrise", "a red car", "a watercolor painting of a small boat, soft light",
           "a futuristic city skyline at night with neon lights", "a cat on a chair"]


def require_stock(lm: LoadedModel) -> None:
    """Raise unless `lm` is transformers' model as loaded (no layer swapped by the engine)."""
    swapped = sum(isinstance(m, PackedLinear) for m in lm.model.modules())
    if swapped:
        raise RuntimeError(f"the reference got a model with {swapped} packed linear layers (the engine's); "
                           "load a separate copy for the reference")


@torch.inference_mode()
def hf_generate_image(lm: LoadedModel, prompt: str, *, cfg_weight: float = 5.0, temperature: float = 1.0,
                      seed: int = 0) -> torch.Tensor:
    """(1, num_image_tokens) codes from transformers' image mode."""
    require_stock(lm)
    ids = torch.tensor([build_generation_ids(lm, prompt)], device=lm.device)
    torch.manual_seed(seed)
    sample = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    # Both lengths spelled out: transformers 5.0 leaves them unset and its image mode then fails on None.
    return lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_mode="image",
                             guidance_scale=cfg_weight, num_return_sequences=1,
                             max_length=ids.shape[1] + lm.num_image_tokens, **sample)


@torch.inference_mode()
def official_loop(lm: LoadedModel, prompt: str, *, parallel_size: int, cfg_weight: float = 5.0,
                  temperature: float = 1.0) -> torch.Tensor:
    """(parallel_size, num_image_tokens) codes, computed the way DeepSeek's reference script does."""
    require_stock(lm)
    model, core = lm.model, lm.model.model.language_model
    cond = build_generation_ids(lm, prompt)
    rows = [cond if i % 2 == 0 else unconditional_ids(lm, cond) for i in range(2 * parallel_size)]
    embeds = model.get_input_embeddings()(torch.tensor(rows, device=lm.device))  # (2P, T, D)
    cache = DynamicCache(config=model.config.text_config)
    codes = torch.zeros((parallel_size, lm.num_image_tokens), dtype=torch.long, device=lm.device)
    for step in range(lm.num_image_tokens):
        hidden = core(inputs_embeds=embeds, **cache_arg(core, cache), use_cache=True).last_hidden_state
        logits = model.model.generation_head(hidden[:, -1, :])  # (2P, V)
        cond_l, uncond_l = logits[0::2], logits[1::2]
        guided = uncond_l + cfg_weight * (cond_l - uncond_l)
        probs = torch.softmax(guided / max(temperature, 1e-5), dim=-1)
        nxt = torch.multinomial(probs, 1)  # (P, 1)
        codes[:, step] = nxt[:, 0]
        embeds = model.prepare_embeddings_for_image_generation(
            torch.cat([nxt, nxt], dim=1).view(-1, 1))  # (2P, 1, D), rows interleaved cond/uncond
    return codes


class _FirstTokenClock(BaseStreamer):
    """Records when generate emits its first new token (the first `put` is the prompt)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first: float | None = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2 and self.first is None:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


@dataclass
class TextRun:
    tokens: int
    seconds: float
    ttft: float
    ids: list[int] = field(default_factory=list)  # the new tokens, EOS and after cut off


@torch.inference_mode()
def hf_understand(lm: LoadedModel, images: Sequence[Image.Image], prompt: str, *, max_new_tokens: int) -> TextRun:
    """Greedy transformers generate for one request; tokens made (without EOS), total time, TTFT."""
    require_stock(lm)
    started = time.perf_counter()
    inputs = build_understanding_inputs(lm, images, prompt)
    ids = torch.tensor([inputs.input_ids], device=lm.device)
    extra = {} if inputs.pixel_values is None else {"pixel_values": inputs.pixel_values.to(lm.device, lm.dtype)}
    clock = _FirstTokenClock()
    out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                            do_sample=False, streamer=clock, **extra)
    seconds = time.perf_counter() - started
    new = out[0, ids.shape[1]:].tolist()
    eos = lm.special["eos"]
    tokens = new.index(eos) if eos in new else len(new)
    return TextRun(tokens, seconds, (clock.first or time.perf_counter()) - started, new[:tokens])


# --- timing helpers ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


def serial_latencies(service_seconds: float, concurrency: int, first_offset: float | None = None) -> list[float]:
    """Latencies of `concurrency` requests arriving together at a one-at-a-time server.

    Request i waits for the i before it; `first_offset` (e.g. TTFT) replaces the last request's own time.
    """
    own = service_seconds if first_offset is None else first_offset
    return [i * service_seconds + own for i in range(concurrency)]


def memcpy_bandwidth(device: torch.device, nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes moved per second (read + write) by a large tensor copy: the roofline's memory figure."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * nbytes / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")
