"""Random-weight Janus checkpoints at benchmark shapes, written with janus_core.tiny.janus's building blocks.

Shapes: `tiny` (the test model), `mid` (~55M parameters with the real 576 image tokens and 384x384
images; runs on 2 CPU cores), and `janus-pro-1b` / `janus-pro-7b` (the real architectures with random
weights, for GPU runs). All use tiny's byte-level tokenizer: the LM vocabulary is the real size where
it says so, but only the tokenizer's ~400 ids ever appear in prompts.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    JanusConfig,
    JanusProcessor,
    JanusVisionConfig,
    JanusVQVAEConfig,
)

from janus_core.models.compat import pil_image_processor_class
from janus_core.text.prompts import CHAT_TEMPLATE, IMAGE_TOKEN
from janus_core.tiny.janus import (
    TINY_NORM,
    build_model,
    build_tokenizer,
    generation_config,
    text_config,
    write_tiny_model,
)


@dataclass(frozen=True)
class Shape:
    lm_hidden: int
    lm_layers: int
    lm_heads: int
    lm_intermediate: int
    vocab: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    codebook: int
    vq_base_channels: int
    vq_res_blocks: int
    image_size: int = 384
    max_context: int = 4096


SHAPES = {
    "mid": Shape(lm_hidden=512, lm_layers=8, lm_heads=8, lm_intermediate=1408, vocab=16384, vision_hidden=384,
                 vision_layers=6, vision_heads=6, codebook=4096, vq_base_channels=32, vq_res_blocks=1,
                 max_context=2048),
    "janus-pro-1b": Shape(lm_hidden=2048, lm_layers=24, lm_heads=16, lm_intermediate=5632, vocab=102400,
                          vision_hidden=1024, vision_layers=24, vision_heads=16, codebook=16384,
                          vq_base_channels=128, vq_res_blocks=2, max_context=16384),
    "janus-pro-7b": Shape(lm_hidden=4096, lm_layers=30, lm_heads=32, lm_intermediate=11008, vocab=102400,
                          vision_hidden=1024, vision_layers=24, vision_heads=16, codebook=16384,
                          vq_base_channels=128, vq_res_blocks=2, max_context=16384),
}


def shape_config(shape: Shape, tokenizer) -> JanusConfig:
    text = text_config(shape, tokenizer)
    vision = JanusVisionConfig(
        hidden_size=shape.vision_hidden, num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads, image_size=shape.image_size, patch_size=16,
        projection_dim=shape.lm_hidden, num_image_tokens=(shape.image_size // 16) ** 2,
    )
    vq = JanusVQVAEConfig(
        embed_dim=8, num_embeddings=shape.codebook, base_channels=shape.vq_base_channels,
        latent_channels=max(32, shape.vq_base_channels * 2), num_res_blocks=shape.vq_res_blocks,
        channel_multiplier=[1, 1, 2, 2, 4], num_patches=shape.image_size // 16,
        projection_dim=shape.lm_hidden, image_token_embed_dim=shape.lm_hidden,
    )
    return JanusConfig(text_config=text, vision_config=vision, vq_config=vq,
                       image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tie_word_embeddings=False)


def write_once(out: str | Path, write: Callable[[Path], object]) -> Path:
    """`out` if it already holds a checkpoint; else `write(folder)` into a `.partial` sibling, renamed to `out`
    when it returns, so a write that was killed is never taken for a checkpoint."""
    out = Path(out)
    if (out / "config.json").exists():
        return out
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    write(partial)
    shutil.rmtree(out, ignore_errors=True)  # what a write from before this rule left
    partial.rename(out)
    return out


def cached_model(shape: str, model_dir: str | None = None) -> Path:
    """`model_dir`, or a random checkpoint of `shape` cached under the temp dir (written on first use)."""
    return write_model(Path(model_dir) if model_dir else Path(tempfile.gettempdir()) / f"janus-bench-{shape}", shape)


def write_model(out: str | Path, shape: str = "mid", seed: int = 0) -> Path:
    """Write a random checkpoint of `shape` in transformers' layout; returns its directory."""
    out = Path(out)
    if (out / "config.json").exists():
        return out
    if shape == "tiny":
        return write_tiny_model(out, "hf", seed)
    tokenizer = build_tokenizer()
    model = build_model(shape_config(SHAPES[shape], tokenizer), seed)
    model.generation_config = generation_config(tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    size = SHAPES[shape].image_size
    processor = JanusProcessor(
        image_processor=pil_image_processor_class()(size={"height": size, "width": size}, min_size=14, **TINY_NORM),
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE, use_default_system_prompt=True,
        num_image_tokens=model.config.vision_config.num_image_tokens,
    )
    processor.save_pretrained(out)
    return out


def lm_weight_bytes(model) -> int:
    """Bytes one image-generation decode step reads: the LM layers, final norm and generation head/embeds."""
    core = model.model.language_model
    parts = [core.layers, core.norm, model.model.generation_head, model.model.generation_aligner]
    return sum(p.numel() * p.element_size() for part in parts for p in part.parameters())


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--shape", default="mid", choices=["tiny", *SHAPES])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_model(args.out, args.shape, args.seed))
