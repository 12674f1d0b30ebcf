"""Loading JanusFlow: DeepSeek's checkpoint layout plus a diffusers `AutoencoderKL` (the SDXL VAE).

The checkpoint has no VAE; `vae` names one (a directory or hub id). When none is given, a `vae/`
directory inside the checkpoint is used if there is one (what `janus-server tiny-model --family
janusflow` writes), otherwise `stabilityai/sdxl-vae`. The VAE runs in fp32, or in bf16 beside a bf16
model; never in fp16, which the SDXL VAE overflows in.

`load_janusflow` returns the same `LoadedModel` as Janus-Pro's loader with `generator = "flow"`,
`image_lead = 1` (each image's features start at its begin-of-image token) and `flow`: the VAE and
the latent shapes the generator works on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from janus_core.errors import ModelLoadError
from janus_core.models.checkpoint import check_state_dict, deepseek_processor, read_weights
from janus_core.models.janusflow_net import (
    JanusFlowConfig,
    JanusFlowForConditionalGeneration,
    to_flow_config,
    to_flow_state_dict,
)
from janus_core.models.uvit import require_diffusers
from janus_core.text.prompts import IMAGE_TOKEN

log = logging.getLogger(__name__)
DEFAULT_VAE = "stabilityai/sdxl-vae"


@dataclass
class FlowParts:
    """The generator's pieces beside the network: the VAE and the shapes of its latents."""

    vae: Any  # diffusers AutoencoderKL, eval, on the device
    vae_dtype: torch.dtype
    scaling_factor: float
    shift_factor: float | None
    latent_channels: int
    latent_size: int  # latents are (latent_channels, latent_size, latent_size)
    grid: int  # the LM sees grid x grid latent tokens


def resolve_vae(vae: str | None, model_path: Path) -> str:
    if vae:
        return vae
    inside = model_path / "vae"
    return str(inside) if (inside / "config.json").is_file() else DEFAULT_VAE


def load_vae(vae: str, device: torch.device, model_dtype: torch.dtype):
    require_diffusers()
    from diffusers import AutoencoderKL

    path = Path(vae).expanduser()
    if not path.is_dir() and (vae.startswith((".", "/", "~")) or vae.count("/") != 1):
        raise ModelLoadError(f"VAE directory {vae!r} does not exist (and it is not a hub id like org/name)")
    dtype = torch.bfloat16 if model_dtype == torch.bfloat16 else torch.float32
    try:
        model = AutoencoderKL.from_pretrained(str(path) if path.is_dir() else vae, torch_dtype=dtype,
                                              low_cpu_mem_usage=False)  # no accelerate: say so, not warn
    except Exception as exc:
        raise ModelLoadError(f"cannot load the VAE {vae!r} (--vae: a diffusers AutoencoderKL directory or hub id): "
                             f"{exc}") from exc
    return model.to(device).eval(), dtype


def _instantiate(config: JanusFlowConfig, state: dict[str, torch.Tensor], dtype: torch.dtype,
                 path: Path) -> JanusFlowForConditionalGeneration:
    with torch.device("meta"):
        skeleton = JanusFlowForConditionalGeneration(config)
    check_state_dict(skeleton, state, config.tie_word_embeddings, path, "JanusFlow")
    model = JanusFlowForConditionalGeneration(config)
    try:
        model.load_state_dict(state, strict=not config.tie_word_embeddings)
    except RuntimeError as exc:
        raise ModelLoadError(f"cannot load the weights of {path}: {exc}") from exc
    return model.to(dtype)


def _latent_shapes(net: JanusFlowForConditionalGeneration, vae, image_size: int, path: Path) -> tuple[int, int]:
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    if image_size % scale:
        raise ModelLoadError(f"image size {image_size} is not a multiple of the VAE's downsampling ({scale})")
    latent = image_size // scale
    grid = net.model.vision_gen_enc_model.grid(latent)
    if grid * net.model.vision_gen_dec_model.scale != latent:
        raise ModelLoadError(f"{path}: the generation encoder makes a {grid}x{grid} grid of {latent}x{latent} "
                             f"latents, which its decoder does not turn back into {latent}x{latent}")
    if vae.config.latent_channels != net.config.latent_channels:
        raise ModelLoadError(f"the VAE has {vae.config.latent_channels} latent channels; the model expects "
                             f"{net.config.latent_channels}")
    return latent, grid


def load_janusflow(path: Path, raw_config: dict[str, Any], device: torch.device, dtype: torch.dtype,
                   vae: str | None):
    """The network, its processor and VAE (the caller finishes the `LoadedModel`)."""
    require_diffusers()
    processor = deepseek_processor(path)
    state = to_flow_state_dict(read_weights(path))
    config = to_flow_config(raw_config, image_token_id=processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                            tie_word_embeddings="lm_head.weight" not in state)
    net = _instantiate(config, state, dtype, path)
    vae_name = resolve_vae(vae, path)
    vae_model, vae_dtype = load_vae(vae_name, device, dtype)
    latent, grid = _latent_shapes(net, vae_model, config.vision_config.image_size, path)
    sf = getattr(vae_model.config, "shift_factor", None)
    parts = FlowParts(vae_model, vae_dtype, float(vae_model.config.scaling_factor), None if sf is None else float(sf),
                      config.latent_channels, latent, grid)
    log.info("JanusFlow generator: VAE %s (%s), %dx%d latents, %d latent tokens", vae_name, vae_dtype, latent,
             latent, grid * grid)
    return net, processor, parts
