"""Tiny random JanusFlow checkpoints (DeepSeek's layout) with a tiny random diffusers VAE beside them.

`write_tiny_flow_model(out)` writes `config.json` (`multi_modality` with the four JanusFlow
sub-configs), `model.safetensors` under DeepSeek's weight names, the tokenizer and processor files of
`janus_core.tiny.janus`, and `out/vae/`: an `AutoencoderKL` with SDXL's 4 latent channels, 8x downsampling
and scaling factor, at toy widths (the loader finds it there when no `--vae` is given). The same
`FlowShape` type gives the benchmark's mid-size shape. 64 px images (the default) make 8x8 latents
and 4x4 = 16 latent tokens; 384 px the real 48x48 latents and 576 tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import JanusVisionConfig

from janus_core.models.janusflow_net import (
    JanusFlowConfig,
    JanusFlowForConditionalGeneration,
    to_deepseek_flow_config,
    to_deepseek_flow_state_dict,
)
from janus_core.models.uvit import require_diffusers
from janus_core.text.prompts import IMAGE_TOKEN
from janus_core.tiny.janus import (
    SHARP_SCALE,
    TINY_PATCH,
    TINY_VOCAB,
    build_tokenizer,
    same_mode,
    text_config,
    write_deepseek_processor,
)

SDXL_SCALING_FACTOR = 0.13025


@dataclass(frozen=True)
class FlowShape:
    lm_hidden: int = 64
    lm_layers: int = 2
    lm_heads: int = 4
    lm_intermediate: int = 128
    vocab: int = TINY_VOCAB
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    uvit_width: int = 32  # the real one is 768
    uvit_layers: int = 1  # ConvNeXt blocks in each mid block (the real one has 2)
    vae_width: int = 32  # every VAE block's channels (SDXL's: 128, 256, 512, 512)
    image_size: int = 64
    max_context: int = 1024


def flow_config(shape: FlowShape, tokenizer) -> JanusFlowConfig:
    text = text_config(shape, tokenizer)
    vision = JanusVisionConfig(
        hidden_size=shape.vision_hidden, num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads, mlp_ratio=2.0, image_size=shape.image_size, patch_size=TINY_PATCH,
        projection_dim=shape.lm_hidden, num_image_tokens=(shape.image_size // TINY_PATCH) ** 2,
    )
    # A patchifying conv of stride 2 over the latents (48x48 -> 24x24 at 384 px), undone by one PixelShuffle(2).
    encoder = {"input_channels": 4, "stride": 2, "kernel_size": 2, "padding": 0,
               "block_out_channels": [shape.uvit_width], "layers_in_middle": shape.uvit_layers,
               "hidden_size": shape.lm_hidden, "elementwise_affine": True, "use_bias": True, "norm_eps": 1e-6,
               "dropout": 0.0, "use_mid_block": True}
    decoder = {"in_channels": shape.uvit_width, "out_channels": 4, "block_out_channels": [shape.uvit_width],
               "upsamples": 1, "layers_in_middle": shape.uvit_layers, "hidden_size": shape.lm_hidden,
               "elementwise_affine": True, "use_bias": True, "norm_eps": 1e-6, "dropout": 0.0,
               "use_mid_block": True}
    return JanusFlowConfig(text, vision, encoder, decoder, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))


# With `sharp`, these parts' matrices are SHARP_SCALE times larger (as janus_core.tiny.janus's): greedy answers
# then depend on every input, the image's features included.
_SHARP_PARTS = ("model.language_model.", "lm_head.", "model.vision_und_enc_aligner.", "model.beg_of_und_embed")


def build_flow_model(config: JanusFlowConfig, seed: int, sharp: bool = False) -> JanusFlowForConditionalGeneration:
    torch.manual_seed(seed)
    model = JanusFlowForConditionalGeneration(config)
    with torch.no_grad():  # noise on every tensor: no exact zeros/ones, so a mis-mapped weight shows
        for name, param in model.named_parameters():
            param.add_(torch.randn_like(param) * 0.02)
            if sharp and param.dim() >= 2 and name.startswith(_SHARP_PARTS):
                param.mul_(SHARP_SCALE)
    return model.eval()


def build_vae(shape: FlowShape, seed: int):
    require_diffusers()
    from diffusers import AutoencoderKL

    torch.manual_seed(seed + 1)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(shape.vae_width,) * 4, layers_per_block=1,
        latent_channels=4, norm_num_groups=min(32, shape.vae_width), sample_size=shape.image_size,
        scaling_factor=SDXL_SCALING_FACTOR,
    ).eval()


def write_tiny_flow_model(out_dir: str | Path, seed: int = 0, *, image_size: int = 64,
                          shape: FlowShape | None = None, sharp: bool = False) -> Path:
    """Write a random JanusFlow checkpoint (DeepSeek layout) and its VAE in `out_dir/vae`; returns the path.
    `sharp`: larger LM weights, as `janus_core.tiny.janus`'s (the oracle tests' checkpoint)."""
    shape = shape or FlowShape(image_size=image_size)
    if shape.image_size < TINY_PATCH or shape.image_size % TINY_PATCH:
        raise ValueError(f"image_size must be a positive multiple of {TINY_PATCH}, got {shape.image_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = flow_config(shape, tokenizer)
    model = build_flow_model(config, seed, sharp)
    raw = to_deepseek_flow_config(config)
    raw["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    state = to_deepseek_flow_state_dict(model.state_dict())
    width = shape.vision_hidden  # the original tower's attention-pool head, which nothing uses
    state["vision_und_enc_model.vision_tower.attn_pool.latent"] = torch.zeros(1, 1, width)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_deepseek_processor(out, tokenizer, shape.image_size, config.vision_config.num_image_tokens)
    build_vae(shape, seed).save_pretrained(out / "vae")
    same_mode(out)
    return out
