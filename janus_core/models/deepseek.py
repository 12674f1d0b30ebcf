"""DeepSeek's original `multi_modality` checkpoint layout, translated in memory.

The original Janus repositories ship a `config.json` with `model_type: multi_modality` and seven
sub-configs, and weights named after the original modules (`vision_model.vision_tower.*`,
`gen_vision_model.*`, ...). This module turns such a config into a transformers `JanusConfig`
and renames (and reshapes) weights into transformers' names, so the same
`JanusForConditionalGeneration` runs both layouts. `to_deepseek_*` does the reverse; the tiny-model
writer uses it to produce original-layout checkpoints for tests.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch
from transformers import JanusConfig, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

from janus_core.errors import ModelLoadError

SUB_CONFIGS = (
    "language_config",
    "vision_config",
    "aligner_config",
    "gen_vision_config",
    "gen_aligner_config",
    "gen_head_config",
)

# The original code hard-wires these architectures by name; tiny checkpoints spell theirs out.
_VISION_TOWERS: dict[str, dict[str, Any]] = {
    "siglip_large_patch16_384": {"width": 1024, "layers": 24, "heads": 16, "mlp_ratio": 4.0, "patch_size": 16},
}
_VQ_MODELS: dict[str, dict[str, Any]] = {
    "VQ-16": {"ch": 128, "z_channels": 256, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2},
}


def is_deepseek_config(config: dict[str, Any]) -> bool:
    return config.get("model_type") == "multi_modality"


def _params(config: dict[str, Any], name: str) -> dict[str, Any]:
    section = config.get(name)
    if not isinstance(section, dict):
        raise ModelLoadError(f"DeepSeek config is missing the {name!r} section")
    return section.get("params", {}) if name != "language_config" else section


def _architecture(params: dict[str, Any], known: dict[str, dict[str, Any]], name: str, what: str):
    arch = dict(known.get(name, {}))
    arch.update({k: params[k] for k in params if k in ("width", "layers", "heads", "mlp_ratio", "patch_size",
                                                       "ch", "z_channels", "ch_mult", "num_res_blocks")})
    expected = next(iter(known.values())).keys()
    missing = [k for k in expected if k not in arch]
    if missing:
        raise ModelLoadError(
            f"unknown {what} {name!r}: known ones are {sorted(known)}; otherwise its params must give {missing}"
        )
    return arch


def to_janus_config(config: dict[str, Any], *, image_token_id: int, tie_word_embeddings: bool) -> JanusConfig:
    """Translate a `multi_modality` config dict into a transformers `JanusConfig`."""
    missing = [name for name in SUB_CONFIGS if name not in config]
    if missing:
        raise ModelLoadError(f"DeepSeek config.json lacks sub-config(s) {missing}")
    lang = dict(_params(config, "language_config"))
    text_keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                 "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act")
    text = LlamaConfig(**{k: lang[k] for k in text_keys if k in lang}, tie_word_embeddings=tie_word_embeddings)

    vision_params = _params(config, "vision_config")
    tower = _architecture(vision_params, _VISION_TOWERS, vision_params.get("model_name", ""), "vision tower")
    aligner = _params(config, "aligner_config")
    image_size = int(vision_params.get("image_size", 384))
    vision = JanusVisionConfig(
        hidden_size=tower["width"],
        num_hidden_layers=tower["layers"],
        num_attention_heads=tower["heads"],
        mlp_ratio=float(tower["mlp_ratio"]),
        patch_size=tower["patch_size"],
        image_size=image_size,
        projection_dim=aligner.get("n_embed", text.hidden_size),
        depth=aligner.get("depth", 2),
        num_image_tokens=(image_size // tower["patch_size"]) ** 2,
    )

    gen_vision = _params(config, "gen_vision_config")
    vq_arch = _architecture(gen_vision, _VQ_MODELS, config["gen_vision_config"].get("cls", ""), "VQ model")
    gen_aligner = _params(config, "gen_aligner_config")
    gen_head = _params(config, "gen_head_config")
    vq = JanusVQVAEConfig(
        embed_dim=gen_vision.get("n_embed", 8),
        num_embeddings=gen_vision.get("image_token_size", 16384),
        latent_channels=vq_arch["z_channels"],
        base_channels=vq_arch["ch"],
        channel_multiplier=list(vq_arch["ch_mult"]),
        num_res_blocks=vq_arch["num_res_blocks"],
        projection_dim=gen_aligner.get("n_embed", text.hidden_size),
        num_hidden_layers=gen_aligner.get("depth", 2),
        image_token_embed_dim=gen_head.get("image_token_embed", text.hidden_size),
    )
    return JanusConfig(
        text_config=text,
        vision_config=vision,
        vq_config=vq,
        image_token_id=image_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )


def to_deepseek_config(config: JanusConfig) -> dict[str, Any]:
    """The `multi_modality` config.json that describes the same network as `config`."""
    t, v, q = config.text_config, config.vision_config, config.vq_config
    return {
        "model_type": "multi_modality",
        "architectures": ["MultiModalityCausalLM"],
        "language_config": {
            "model_type": "llama",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "max_position_embeddings": t.max_position_embeddings,
            "rms_norm_eps": t.rms_norm_eps,
        },
        "vision_config": {
            "cls": "CLIPVisionTower",
            "model_type": "vision",
            "params": {
                "image_size": v.image_size,
                "model_name": f"siglip_custom_patch{v.patch_size}_{v.image_size}",
                "select_feature": "same",
                "select_layer": -1,
                "width": v.hidden_size,
                "layers": v.num_hidden_layers,
                "heads": v.num_attention_heads,
                "mlp_ratio": v.mlp_ratio,
                "patch_size": v.patch_size,
            },
        },
        "aligner_config": {
            "cls": "MlpProjector",
            "model_type": "aligner",
            "params": {"depth": v.depth, "input_dim": v.hidden_size, "n_embed": v.projection_dim,
                       "projector_type": "mlp_gelu"},
        },
        "gen_vision_config": {
            "cls": "VQ-custom",
            "model_type": "gen_vision",
            "params": {"image_token_size": q.num_embeddings, "n_embed": q.embed_dim, "ch": q.base_channels,
                       "z_channels": q.latent_channels, "ch_mult": list(q.channel_multiplier),
                       "num_res_blocks": q.num_res_blocks},
        },
        "gen_aligner_config": {
            "cls": "MlpProjector",
            "model_type": "gen_aligner",
            "params": {"depth": q.num_hidden_layers, "input_dim": q.embed_dim, "n_embed": q.projection_dim,
                       "projector_type": "mlp_gelu"},
        },
        "gen_head_config": {
            "cls": "vision_head",
            "model_type": "gen_head",
            "params": {"image_token_embed": q.image_token_embed_dim, "image_token_size": q.num_embeddings,
                       "n_embed": q.projection_dim},
        },
    }


# --- weight names -------------------------------------------------------------------------------
# Each rule rewrites a prefix or a path segment; they are applied in order to every original name.
_DS_TO_HF: list[tuple[str, str]] = [
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^vision_model\.vision_tower\.patch_embed\.proj\.", "model.vision_model.embeddings.patch_embedding."),
    (r"^vision_model\.vision_tower\.pos_embed$", "model.vision_model.embeddings.position_embedding.weight"),
    (r"^vision_model\.vision_tower\.norm\.", "model.vision_model.post_layernorm."),
    (r"^vision_model\.vision_tower\.blocks\.(\d+)\.", r"model.vision_model.encoder.layers.\1."),
    (r"^(model\.vision_model\.encoder\.layers\.\d+)\.norm([12])\.", r"\1.layer_norm\2."),
    (r"^(model\.vision_model\.encoder\.layers\.\d+)\.attn\.proj\.", r"\1.self_attn.projection_layer."),
    (r"^(model\.vision_model\.encoder\.layers\.\d+)\.attn\.qkv\.", r"\1.self_attn.qkv."),
    (r"^gen_vision_model\.", "model.vqmodel."),
    (r"^(model\.vqmodel\.encoder)\.conv_blocks\.", r"\1.down."),
    (r"^(model\.vqmodel\.decoder)\.conv_blocks\.", r"\1.up."),
    (r"^(model\.vqmodel\..*)\.res\.(\d+)\.", r"\1.block.\2."),
    (r"^(model\.vqmodel\.\w+\.mid)\.0\.", r"\1.block_1."),
    (r"^(model\.vqmodel\.\w+\.mid)\.1\.", r"\1.attn_1."),
    (r"^(model\.vqmodel\.\w+\.mid)\.2\.", r"\1.block_2."),
    (r"^gen_head\.output_mlp_projector\.", "model.generation_head.proj_out."),
    (r"^gen_head\.vision_head\.", "model.generation_head.vision_head."),
    (r"^gen_embed\.", "model.generation_embeddings."),
    (r"^gen_aligner\.", "model.generation_aligner."),
    (r"^aligner\.", "model.aligner."),
]
# Original weights with no counterpart in the transformers model.
_DS_DROPPED = (
    re.compile(r"^vision_model\.vision_tower\.attn_pool\."),
    re.compile(r"^gen_vision_model\.quantize\.codebook_used$"),
)
_MLP_LAYER = re.compile(r"^(model\.(?:generation_)?aligner)\.layers\.(\d+)\.")


def _rename_mlp(name: str) -> str:
    # mlp_gelu projectors are Sequential(Linear, GELU, Linear, GELU, ...): Linear k sits at index 2k.
    match = _MLP_LAYER.match(name)
    if not match:
        return name
    index = int(match.group(2))
    target = "fc1" if index == 0 else f"hidden_layers.{index // 2 - 1}"
    return f"{match.group(1)}.{target}.{name[match.end():]}"


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and split/reshape) original-layout weights into transformers' names.

    Names no rule recognises pass through unchanged, so the caller can report them as unexpected.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if any(p.match(name) for p in _DS_DROPPED):
            continue
        new = name
        for pattern, repl in _DS_TO_HF:
            new = re.sub(pattern, repl, new)
        new = _rename_mlp(new)
        if ".self_attn.qkv." in new:
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0), strict=True):
                out[new.replace(".qkv.", f".{part}.")] = chunk.contiguous()
            continue
        if new.endswith("embeddings.position_embedding.weight") and tensor.dim() == 3:
            tensor = tensor.squeeze(0)
        out[new] = tensor
    return out


_HF_TO_DS: list[tuple[str, str]] = [
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.vision_model\.embeddings\.patch_embedding\.", "vision_model.vision_tower.patch_embed.proj."),
    (r"^model\.vision_model\.embeddings\.position_embedding\.weight$", "vision_model.vision_tower.pos_embed"),
    (r"^model\.vision_model\.post_layernorm\.", "vision_model.vision_tower.norm."),
    (r"^model\.vision_model\.encoder\.layers\.(\d+)\.", r"vision_model.vision_tower.blocks.\1."),
    (r"^(vision_model\.vision_tower\.blocks\.\d+)\.layer_norm([12])\.", r"\1.norm\2."),
    (r"^(vision_model\.vision_tower\.blocks\.\d+)\.self_attn\.projection_layer\.", r"\1.attn.proj."),
    (r"^model\.vqmodel\.", "gen_vision_model."),
    (r"^(gen_vision_model\.encoder)\.down\.", r"\1.conv_blocks."),
    (r"^(gen_vision_model\.decoder)\.up\.", r"\1.conv_blocks."),
    (r"^(gen_vision_model\..*)\.block\.(\d+)\.", r"\1.res.\2."),
    (r"^(gen_vision_model\.\w+\.mid)\.block_1\.", r"\1.0."),
    (r"^(gen_vision_model\.\w+\.mid)\.attn_1\.", r"\1.1."),
    (r"^(gen_vision_model\.\w+\.mid)\.block_2\.", r"\1.2."),
    (r"^model\.generation_head\.proj_out\.", "gen_head.output_mlp_projector."),
    (r"^model\.generation_head\.vision_head\.", "gen_head.vision_head."),
    (r"^model\.generation_embeddings\.", "gen_embed."),
    (r"^model\.generation_aligner\.fc1\.", "gen_aligner.layers.0."),
    (r"^model\.aligner\.fc1\.", "aligner.layers.0."),
]
_HF_HIDDEN = re.compile(r"^model\.(generation_aligner|aligner)\.hidden_layers\.(\d+)\.")


def _qkv_templates(state: dict[str, torch.Tensor]) -> Iterator[str]:
    for name in state:
        if ".self_attn.q_proj." in name and name.startswith("model.vision_model."):
            yield name.replace(".q_proj.", ".{}.")


def to_deepseek_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `to_hf_state_dict` (fused qkv, 3-D position embedding)."""
    merged: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    for template in _qkv_templates(state):
        parts = [template.format(p) for p in ("q_proj", "k_proj", "v_proj")]
        merged[template.format("qkv")] = torch.cat([state[p] for p in parts], dim=0)
        consumed.update(parts)
    items = [(k, v) for k, v in state.items() if k not in consumed] + list(merged.items())
    out: dict[str, torch.Tensor] = {}
    for name, tensor in items:
        new = name.replace(".self_attn.qkv.", ".attn.qkv.")
        hidden = _HF_HIDDEN.match(new)
        if hidden:
            prefix = "gen_aligner" if hidden.group(1) == "generation_aligner" else "aligner"
            new = f"{prefix}.layers.{2 * (int(hidden.group(2)) + 1)}.{new[hidden.end():]}"
        for pattern, repl in _HF_TO_DS:
            new = re.sub(pattern, repl, new)
        if new == "vision_model.vision_tower.pos_embed":
            tensor = tensor.unsqueeze(0)
        out[new] = tensor.contiguous()
    return out
