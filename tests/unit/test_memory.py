"""Memory planning: sizes, KV bytes per token, and what `janus-server plan` says fits on real GPUs."""

from __future__ import annotations

import json

import pytest

from janus_core.engine import memory
from janus_core.models import deepseek
from tests.support.real_configs import janus_pro_config, write_config

GiB = 2**30


@pytest.mark.parametrize(("text", "expected"), [
    ("6GiB", 6 * GiB), ("512MiB", 512 * 2**20), ("24GB", 24 * 10**9), ("1.5g", 1_500_000_000), ("4096", 4096),
    (" 2 gib ", 2 * GiB), (7, 7),
])
def test_sizes_parse(text, expected):
    assert memory.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "6 GiBs", "-1GiB", "1e3"])
def test_bad_sizes_are_named(text):
    with pytest.raises(ValueError, match="cannot read"):
        memory.parse_size(text)


@pytest.mark.parametrize(("size", "kib"), [("7b", 480), ("1b", 192)])
def test_kv_bytes_per_token_of_the_real_models(size, kib):
    janus = deepseek.to_janus_config(janus_pro_config(size), image_token_id=0, tie_word_embeddings=False)
    assert memory.kv_bytes_per_token(janus.text_config, "bfloat16") == kib * 1024


def test_plan_for_janus_pro_7b_fits_the_cards_people_have(tmp_path):
    result = memory.plan(str(write_config(tmp_path / "7b", "7b")), [24 * GiB, 80 * GiB])
    assert 14.5e9 < result["weights_bytes"] < 15.1e9  # 7.4B parameters in bf16
    assert result["kv_bytes_per_token"] == 480 * 1024
    on24, on80 = result["plans"]
    assert on24["concurrent_images"] >= 8 and on24["concurrent_sequences"] >= 8
    assert on80["concurrent_images"] >= 72
    for p in result["plans"]:
        assert p["kv_tokens"] * result["kv_bytes_per_token"] == p["kv_cache_bytes"]
        assert p["concurrent_images"] == p["kv_tokens"] // 16 // memory.image_blocks(40, 576)


def test_plan_reads_the_transformers_layout_too(tmp_path):
    janus = deepseek.to_janus_config(janus_pro_config("1b"), image_token_id=100581, tie_word_embeddings=False)
    (tmp_path / "config.json").write_text(json.dumps(janus.to_dict()))
    hf = memory.plan(str(tmp_path), [40 * GiB])
    ds = memory.plan(str(write_config(tmp_path / "ds", "1b")), [40 * GiB])
    assert hf["plans"] == ds["plans"] and hf["kv_bytes_per_token"] == 192 * 1024


def test_int8_weights_put_janus_pro_7b_on_16_gib_cards(tmp_path):
    """The issue's targets: int8 >= 6 images in flight on 16 GiB and >= 18 on 24 GiB (bf16: none and 11)."""
    config = str(write_config(tmp_path / "7b", "7b"))
    full = memory.plan(config, [16 * GiB, 24 * GiB])
    int8 = memory.plan(config, [16 * GiB, 24 * GiB], quantization="int8")
    assert [p["concurrent_images"] for p in full["plans"]] == [0, 11]
    on16, on24 = (p["concurrent_images"] for p in int8["plans"])
    assert on16 >= 6 and on24 >= 18
    # The LM's linears and both heads at a byte per weight; embeddings, vision and VQ stay in bf16.
    assert 8.0e9 < int8["weights_bytes"] < 8.5e9 and int8["quantization"] == "int8"
    assert memory.plan(config, [16 * GiB], quantization="fp8")["weights_bytes"] == int8["weights_bytes"]
    with pytest.raises(ValueError, match="unknown quantization"):
        memory.plan(config, [16 * GiB], quantization="int4")
