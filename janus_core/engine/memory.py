"""Memory planning: how big the KV block pool is, and what fits in it.

One function answers both "how large a pool does this engine get" (at start-up, from the device or
an explicit size) and "what would fit on a 24/40/48/80 GiB card" (`janus-server plan`, from
config.json alone), so the planner and the running server cannot drift apart.

- KV bytes per token = 2 (K and V) x layers x KV heads x head dim x dtype bytes.
- A generation image holds two rows (its CFG pair) of prompt + image tokens - 1 positions (the last
  code is sampled, never fed back); an understanding sequence its prompt and answer.
- The pool is `utilization x device memory` minus the weights, the activation peak and what other
  processes hold; or an explicit `--kv-cache-memory` size.

This module knows bytes, blocks and configs; not requests or tensors' contents. It imports no torch
(`janus-server api` reads sizes with it): dtypes are named, or torch dtypes read by name.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from janus_core.errors import ModelLoadError
from janus_core.sched.block_pool import BLOCK_SIZE
from janus_core.sched.sequence import blocks_for, cfg_pair_blocks

GiB = 2**30
PLAN_MEMORIES = (24 * GiB, 40 * GiB, 48 * GiB, 80 * GiB)
PLAN_PROMPT_TOKENS = 40  # a typical generation prompt with its chat format
PLAN_SEQUENCE_TOKENS = 1000  # a typical understanding request: one image, a question and an answer
CPU_DEFAULT_KV_BYTES = 2 * GiB  # a laptop's share for KV when nothing says otherwise
CUDA_RESERVE_BYTES = GiB // 2  # CUDA context, allocator slack and the vision/VQ passes beside the LM
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """'6GiB', '512MiB', '24GB', '1.5g' or plain bytes -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 6GiB, 512MiB or 24GB")
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(nbytes: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{int(nbytes)} B"


def dtype_bytes(dtype: Any) -> int:
    """Bytes of one element of `dtype`: a name ("bfloat16") or a torch dtype (read by its name)."""
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[name]


def kv_bytes_per_token(text_config: Any, dtype: Any) -> int:
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return 2 * text_config.num_hidden_layers * text_config.num_key_value_heads * head_dim * dtype_bytes(dtype)


def image_blocks(prompt_tokens: int, image_tokens: int, n: int = 1, block_size: int = BLOCK_SIZE) -> int:
    """Blocks a generation request of n images holds (`janus_core.sched.sequence.cfg_pair_blocks`)."""
    return cfg_pair_blocks(prompt_tokens, prompt_tokens + image_tokens - 1, n, block_size)


@dataclass(frozen=True)
class Capacity:
    memory_bytes: int | None  # the device size this was planned for (None: an explicit pool size)
    kv_cache_bytes: int
    kv_tokens: int
    concurrent_images: int  # 40-token prompts, n = 1, with CFG
    concurrent_sequences: int  # 1,000-token understanding sequences

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return (f"KV pool {format_size(self.kv_cache_bytes)} = {self.kv_tokens} tokens: "
                f"{self.concurrent_images} images or {self.concurrent_sequences} 1k-token sequences at once")


def capacity(kv_cache_bytes: int, kv_per_token: int, image_tokens: int, memory_bytes: int | None = None,
             block_size: int = BLOCK_SIZE) -> Capacity:
    num_blocks = max(kv_cache_bytes, 0) // (kv_per_token * block_size)
    return Capacity(
        memory_bytes=memory_bytes,
        kv_cache_bytes=num_blocks * block_size * kv_per_token,
        kv_tokens=num_blocks * block_size,
        concurrent_images=num_blocks // image_blocks(PLAN_PROMPT_TOKENS, image_tokens, 1, block_size),
        concurrent_sequences=num_blocks // blocks_for(PLAN_SEQUENCE_TOKENS, block_size),
    )


def activation_bytes(text_config: Any, dtype: Any, max_prefill_tokens: int, max_rows: int) -> int:
    """An upper estimate of the LM's activation peak: a prefill of `max_prefill_tokens` or a decode of `max_rows`.

    Used by the planner; at start-up on CUDA the engine measures the real peak instead.
    """
    width = 4 * text_config.hidden_size + 2 * text_config.intermediate_size  # residual, q/k/v/o, gate/up
    prefill = max_prefill_tokens * width * dtype_bytes(dtype)
    logits = max_rows * text_config.vocab_size * 4  # fp32 logits of a decode step
    return prefill + logits


def pool_bytes(memory_bytes: int, utilization: float, weights_bytes: int, activation: int,
               others: int = 0) -> int:
    """The KV pool's share of a device: `utilization` of it, minus weights, activations and other users."""
    if not (0.0 < utilization <= 1.0):
        raise ValueError(f"gpu memory utilization must be in (0, 1], got {utilization}")
    return max(int(memory_bytes * utilization) - weights_bytes - activation - others - CUDA_RESERVE_BYTES, 0)


def engine_pool_bytes(cfg: Any, device: Any, per_token: int, context: int, profile_peak: Any) -> int:
    """An engine's KV pool: `cfg.kv_cache_memory` when given; on CUDA `cfg.gpu_memory_utilization` of the
    device minus the weights, other processes and the activation peak `profile_peak(rows)` measures;
    on CPU a laptop's share, or less when the batch cap could never use it."""
    if cfg.kv_cache_memory is not None:
        return cfg.kv_cache_memory
    if device.type == "cuda":
        from janus_core.models.device import device_memory

        total, weights, others = device_memory(device)
        peak = profile_peak(2 * cfg.max_batch_size)
        return pool_bytes(total, cfg.gpu_memory_utilization, weights, peak, others)
    return min(CPU_DEFAULT_KV_BYTES, 2 * cfg.max_batch_size * context * per_token)


# --- planning from a checkpoint's config.json alone -----------------------------------------------
def read_config(model: str) -> tuple[dict[str, Any], str]:
    """config.json of a local directory or of a hub id already in the local cache (nothing is downloaded)."""
    path = Path(model).expanduser()
    if path.is_dir():
        file = path / "config.json"
        if not file.is_file():
            raise ModelLoadError(f"{path} has no config.json")
    else:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, "config.json") if model.count("/") == 1 else None
        if not isinstance(found, str):
            raise ModelLoadError(f"{model!r} is neither a local directory nor a hub id in the local cache")
        file = Path(found)
    try:
        return json.loads(file.read_text()), str(file)
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {file}: {exc}") from exc


def janus_config(config: dict[str, Any]):
    """A transformers `JanusConfig` for either layout's config.json."""
    from transformers import JanusConfig

    from janus_core.models import deepseek
    from janus_core.models.janusflow_net import is_flow_config

    if is_flow_config(config):  # its KV is a request's prompts only; activations, not KV, bound its batch
        raise ModelLoadError("plan does not cover JanusFlow checkpoints yet (a flow request holds only its prompt's "
                             "KV, so the KV pool does not bound its images; the step activations do)")
    if deepseek.is_deepseek_config(config):
        return deepseek.to_janus_config(config, image_token_id=0, tie_word_embeddings=False)
    if config.get("model_type") != "janus":
        raise ModelLoadError(f"config.json has model_type {config.get('model_type')!r}; expected janus or "
                             "multi_modality")
    return JanusConfig(**{k: v for k, v in config.items() if k != "model_type"})


def weights_bytes(janus: Any, dtype: str, quantization: str = "none") -> int:
    """The checkpoint's weights in `dtype`, counted on the meta device (no memory, no weights read); with int8
    or fp8 the quantized linears (`janus_core.models.quantize.target_linears`) at their stored size."""
    import torch
    from transformers import JanusForConditionalGeneration

    from janus_core.models.quantize import QUANTIZATIONS, quantized_bytes, target_linears

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; use one of {', '.join(QUANTIZATIONS)}")
    with torch.device("meta"):
        model = JanusForConditionalGeneration(janus)
    size = dtype_bytes(dtype)
    params = {id(p): p for p in model.parameters()}  # tied weights once
    total = sum(p.numel() for p in params.values()) * size
    if quantization != "none":
        for linear in target_linears(model):
            total += quantized_bytes(linear, size) - sum(p.numel() for p in linear.parameters()) * size
    return total


def plan(model: str, memories: list[int], dtype: str = "bfloat16", utilization: float = 0.9,
         max_prefill_tokens: int = 8192, max_rows: int = 128, quantization: str = "none") -> dict[str, Any]:
    config, _ = read_config(model)
    janus = janus_config(config)
    text = janus.text_config
    weights = weights_bytes(janus, dtype, quantization)
    per_token = kv_bytes_per_token(text, dtype)
    activation = activation_bytes(text, dtype, max_prefill_tokens, max_rows)
    image_tokens = int(janus.vision_config.num_image_tokens)
    plans = [capacity(pool_bytes(m, utilization, weights, activation), per_token, image_tokens, m).as_dict()
             for m in memories]
    return {"weights_bytes": weights, "kv_bytes_per_token": per_token, "activation_bytes": activation,
            "dtype": dtype, "quantization": quantization, "gpu_memory_utilization": utilization,
            "block_size": BLOCK_SIZE, "plans": plans}
