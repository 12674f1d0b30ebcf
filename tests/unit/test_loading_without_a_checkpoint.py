"""Loading errors that need no checkpoint (a missing directory, a file, an unknown hub id, an unknown format, no
config.json), and the real Janus-Pro-7B config translated to the transformers architecture (shapes only)."""

from __future__ import annotations

import json

import pytest

from janus_core.errors import ModelLoadError
from janus_core.models import deepseek
from janus_core.models.loader import load_model
from tests.support.real_configs import janus_pro_config


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_file_instead_of_directory(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(str(tmp_path / "f.bin"))


def test_unreachable_hub_id_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="could not be fetched"):
        load_model("deepseek-community/Janus-Pro-1B-does-not-exist-here")


def test_unknown_format(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="model_type 'bert'"):
        load_model(str(tmp_path))


def test_missing_config(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json does not exist"):
        load_model(str(tmp_path))


def test_real_janus_pro_config_translates():
    """The shape of deepseek-ai/Janus-Pro-7B's config.json maps onto the real architecture."""
    config = janus_pro_config("7b")
    cfg = deepseek.to_janus_config(config, image_token_id=100581, tie_word_embeddings=False)
    assert cfg.vision_config.hidden_size == 1024 and cfg.vision_config.num_hidden_layers == 24
    assert cfg.vision_config.num_image_tokens == 576
    assert cfg.vq_config.num_embeddings == 16384 and cfg.vq_config.base_channels == 128
    assert cfg.vq_config.num_patches == 24
    assert cfg.text_config.num_hidden_layers == 30
