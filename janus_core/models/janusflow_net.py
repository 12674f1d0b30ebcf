"""The JanusFlow network: Janus' understanding path and a rectified-flow image generator on one Llama.

`JanusFlowForConditionalGeneration` has the attributes the runtime reads from transformers' Janus
model (`model.language_model`, `lm_head`, `get_input_embeddings`, `model.get_image_features`,
`config.text_config` / `vision_config` / `image_token_id`), so the understanding engine, the paged
KV cache and the runner drive it unchanged. Its pieces come from libraries where they exist
(transformers' `LlamaModel` and Janus SigLIP tower, diffusers' time embedding in `janus_core.models.uvit`)
and its own generation parts are DeepSeek's: the ShallowUViT encoder/decoder and three aligners.

Understanding differs from Janus-Pro in two ways: the aligner is one Linear, and the begin-of-image
position of each image takes the learned `beg_of_und_embed` (so an image's features are 1 + N rows,
written from its begin-of-image token on; `LoadedModel.image_lead` is 1).

DeepSeek's layout (`model_type: multi_modality` with `vision_und_enc_config`, `vision_gen_enc_config`,
`vision_gen_dec_config`, `language_config`) is read and written here; weight names map by prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from transformers import JanusVisionConfig, JanusVisionModel, LlamaConfig, LlamaModel
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from janus_core.errors import ModelLoadError
from janus_core.models import deepseek
from janus_core.models.uvit import ShallowUViTDecoder, ShallowUViTEncoder

FLOW_SUB_CONFIGS = ("vision_und_enc_config", "vision_gen_enc_config", "vision_gen_dec_config", "language_config")


def is_flow_config(config: dict[str, Any]) -> bool:
    return deepseek.is_deepseek_config(config) and "vision_gen_enc_config" in config


@dataclass
class JanusFlowConfig:
    """What the network is built from; `text_config` / `vision_config` / `image_token_id` as in JanusConfig."""

    text_config: LlamaConfig
    vision_config: JanusVisionConfig
    encoder: dict[str, Any]  # ShallowUViTEncoder params, as in the checkpoint
    decoder: dict[str, Any]  # ShallowUViTDecoder params
    image_token_id: int
    tie_word_embeddings: bool = False

    @property
    def latent_channels(self) -> int:
        return int(self.encoder.get("input_channels", 4))


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    section = config.get(name)
    if not isinstance(section, dict):
        raise ModelLoadError(f"JanusFlow config is missing the {name!r} section")
    return section


def to_flow_config(config: dict[str, Any], *, image_token_id: int, tie_word_embeddings: bool) -> JanusFlowConfig:
    missing = [name for name in FLOW_SUB_CONFIGS if name not in config]
    if missing:
        raise ModelLoadError(f"JanusFlow config.json lacks sub-config(s) {missing}")
    lang = _section(config, "language_config")
    text_keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                 "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act")
    text = LlamaConfig(**{k: lang[k] for k in text_keys if k in lang}, tie_word_embeddings=tie_word_embeddings)
    params = _section(config, "vision_und_enc_config").get("params", {})
    tower = deepseek._architecture(params, deepseek._VISION_TOWERS, params.get("model_name", ""), "vision tower")
    image_size = int(params.get("image_size", 384))
    vision = JanusVisionConfig(
        hidden_size=tower["width"], num_hidden_layers=tower["layers"], num_attention_heads=tower["heads"],
        mlp_ratio=float(tower["mlp_ratio"]), patch_size=tower["patch_size"], image_size=image_size,
        projection_dim=text.hidden_size, num_image_tokens=(image_size // tower["patch_size"]) ** 2,
    )
    encoder = dict(_section(config, "vision_gen_enc_config").get("params", {}))
    decoder = dict(_section(config, "vision_gen_dec_config").get("params", {}))
    for name, part in (("vision_gen_enc_config", encoder), ("vision_gen_dec_config", decoder)):
        if int(part.get("hidden_size", 2048)) != text.hidden_size:
            raise ModelLoadError(f"{name} has hidden_size {part.get('hidden_size', 2048)}; the LM's is "
                                 f"{text.hidden_size}")
    return JanusFlowConfig(text, vision, encoder, decoder, image_token_id, tie_word_embeddings)


def to_deepseek_flow_config(config: JanusFlowConfig) -> dict[str, Any]:
    """The `multi_modality` config.json that describes `config` (the tiny-model writer's)."""
    t, v = config.text_config, config.vision_config
    return {
        "model_type": "multi_modality",
        "architectures": ["MultiModalityCausalLM"],
        "language_config": {
            "model_type": "llama", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
            "max_position_embeddings": t.max_position_embeddings, "rms_norm_eps": t.rms_norm_eps,
        },
        "vision_und_enc_config": {
            "cls": "CLIPVisionTower", "model_type": "vision_und_enc",
            "params": {"image_size": v.image_size, "model_name": f"siglip_custom_patch{v.patch_size}_{v.image_size}",
                       "select_feature": "same", "select_layer": -1, "width": v.hidden_size,
                       "layers": v.num_hidden_layers, "heads": v.num_attention_heads, "mlp_ratio": v.mlp_ratio,
                       "patch_size": v.patch_size},
        },
        "vision_gen_enc_config": {"cls": "ShallowUViTEncoder", "model_type": "vision_gen_enc",
                                  "params": dict(config.encoder)},
        "vision_gen_dec_config": {"cls": "ShallowUViTDecoder", "model_type": "vision_gen_dec",
                                  "params": dict(config.decoder)},
    }


class JanusFlowModel(nn.Module):
    """Everything but the LM head (as transformers' `JanusModel` is to `JanusForConditionalGeneration`)."""

    def __init__(self, config: JanusFlowConfig) -> None:
        super().__init__()
        hidden = config.text_config.hidden_size
        self.vision_model = JanusVisionModel(config.vision_config)
        self.vision_und_enc_aligner = nn.Linear(config.vision_config.hidden_size, hidden)
        self.beg_of_und_embed = nn.Parameter(torch.zeros(1, hidden))
        self.language_model = LlamaModel(config.text_config)
        self.vision_gen_enc_model = ShallowUViTEncoder(**config.encoder)
        width = self.vision_gen_enc_model.width
        self.vision_gen_enc_aligner = nn.Linear(width, hidden)
        self.vision_gen_dec_aligner_norm = LlamaRMSNorm(hidden, eps=config.text_config.rms_norm_eps)
        self.vision_gen_dec_model = ShallowUViTDecoder(**config.decoder)
        self.vision_gen_dec_aligner = nn.Linear(hidden, self.vision_gen_dec_model.in_channels)

    def get_image_features(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        """(N, 3, H, W) -> `pooler_output` (N, 1 + num_image_tokens, D): begin-of-image embedding, then SigLIP."""
        feats = self.vision_und_enc_aligner(self.vision_model(pixel_values).last_hidden_state)  # (N, T, D)
        lead = self.beg_of_und_embed.to(feats.dtype).expand(feats.shape[0], 1, -1)
        return SimpleNamespace(pooler_output=torch.cat([lead, feats], dim=1))


class JanusFlowForConditionalGeneration(nn.Module):
    def __init__(self, config: JanusFlowConfig) -> None:
        super().__init__()
        self.config = config
        self.model = JanusFlowModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.language_model.embed_tokens


# --- weight names: DeepSeek's <-> ours ----------------------------------------------------------------
_OWN_PREFIXES = ("vision_und_enc_aligner.", "beg_of_und_embed", "vision_gen_enc_model.", "vision_gen_enc_aligner.",
                 "vision_gen_dec_aligner_norm.", "vision_gen_dec_aligner.", "vision_gen_dec_model.")


def to_flow_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DeepSeek's names -> ours. Unknown names pass through, so the loader reports them as unexpected."""
    vision = {"vision_model." + k.removeprefix("vision_und_enc_model."): v for k, v in state.items()
              if k.startswith("vision_und_enc_model.")}
    out = deepseek.to_hf_state_dict(vision)  # the same SigLIP tower as Janus: model.vision_model.*
    for name, tensor in state.items():
        if name.startswith("vision_und_enc_model."):
            continue
        if name.startswith("language_model.model."):
            out["model.language_model." + name.removeprefix("language_model.model.")] = tensor
        elif name.startswith("language_model.lm_head."):
            out["lm_head." + name.removeprefix("language_model.lm_head.")] = tensor
        elif name.startswith(_OWN_PREFIXES):
            out["model." + name] = tensor
        else:
            out[name] = tensor
    return out


def to_deepseek_flow_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> DeepSeek's (the inverse of `to_flow_state_dict`)."""
    vision = {k: v for k, v in state.items() if k.startswith("model.vision_model.")}
    out = {"vision_und_enc_model." + k.removeprefix("vision_model."): v
           for k, v in deepseek.to_deepseek_state_dict(vision).items()}
    for name, tensor in state.items():
        if name.startswith("model.vision_model."):
            continue
        if name.startswith("model.language_model."):
            out["language_model.model." + name.removeprefix("model.language_model.")] = tensor.contiguous()
        elif name.startswith("lm_head."):
            out["language_model." + name] = tensor.contiguous()
        else:
            out[name.removeprefix("model.")] = tensor.contiguous()
    return out
