"""config.json of the real checkpoints (shapes only, no weights), for tests that plan or translate them."""

from __future__ import annotations

import json
from pathlib import Path


def janus_pro_config(size: str = "7b") -> dict:
    """The shape of deepseek-ai/Janus-Pro-7B's (or -1B's) config.json, DeepSeek's original layout."""
    hidden, inter, layers, heads = {"7b": (4096, 11008, 30, 32), "1b": (2048, 5632, 24, 16)}[size]
    return {
        "model_type": "multi_modality",
        "language_config": {"hidden_size": hidden, "intermediate_size": inter, "max_position_embeddings": 16384,
                            "model_type": "llama", "num_attention_heads": heads, "num_hidden_layers": layers,
                            "num_key_value_heads": heads, "vocab_size": 102400},
        "vision_config": {"cls": "CLIPVisionTower", "params": {"image_size": 384, "model_name":
                          "siglip_large_patch16_384", "select_feature": "same", "select_layer": -1}},
        "aligner_config": {"cls": "MlpProjector", "params": {"depth": 2, "input_dim": 1024, "n_embed": hidden,
                                                             "projector_type": "mlp_gelu"}},
        "gen_vision_config": {"cls": "VQ-16", "params": {"image_token_size": 16384, "n_embed": 8}},
        "gen_aligner_config": {"cls": "MlpProjector", "params": {"depth": 2, "input_dim": 8, "n_embed": hidden,
                                                                 "projector_type": "mlp_gelu"}},
        "gen_head_config": {"cls": "vision_head", "params": {"image_token_embed": hidden, "image_token_size": 16384,
                                                             "n_embed": hidden}},
    }


def write_config(directory: Path, size: str = "7b") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(janus_pro_config(size)))
    return directory
