"""Loading both checkpoint layouts, sharded weights, and the errors for broken checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import JanusForConditionalGeneration, JanusProcessor

from janus_core.errors import ModelLoadError
from janus_core.models import deepseek
from janus_core.models.loader import load_model, read_weights
from janus_core.tiny.janus import write_tiny_model


def _same_weights(a, b) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_both_layouts_of_one_seed_load_the_same_model(tiny_hf, tiny_ds):
    assert tiny_hf.format == "hf" and tiny_ds.format == "deepseek"
    assert _same_weights(tiny_hf, tiny_ds)
    assert tiny_hf.special == tiny_ds.special
    assert tiny_hf.model.config.to_dict()["text_config"]["num_hidden_layers"] == 2
    assert not tiny_ds.model.config.tie_word_embeddings  # the original has its own lm_head


def test_both_layouts_build_the_same_prompts(tiny_hf, tiny_ds):
    from PIL import Image

    from janus_core.text.processor import build_generation_ids, build_understanding_inputs

    image = Image.new("RGB", (40, 70), (10, 200, 30))
    a = build_understanding_inputs(tiny_hf, [image], "What colour?")
    b = build_understanding_inputs(tiny_ds, [image], "What colour?")
    assert a.input_ids == b.input_ids
    assert torch.equal(a.pixel_values, b.pixel_values)
    assert build_generation_ids(tiny_hf, "a cat") == build_generation_ids(tiny_ds, "a cat")


def test_prompt_format_is_janus_pro_chat(tiny_hf):
    from PIL import Image

    from janus_core.text.processor import build_generation_ids, build_understanding_inputs

    tok = tiny_hf.tokenizer
    inputs = build_understanding_inputs(tiny_hf, [Image.new("RGB", (20, 20))], "Hi there")
    text = tok.decode(inputs.input_ids)
    expected = ("<｜begin▁of▁sentence｜>You are a helpful language and vision assistant. You are able to understand "
                "the visual content that the user provides, and assist the user with a variety of tasks using "
                "natural language.\n\n<|User|>: <begin_of_image>" + "<image_placeholder>" * 16
                + "<end_of_image>\nHi there\n\n<|Assistant|>:")
    assert text == expected
    gen = tok.decode(build_generation_ids(tiny_hf, "a cat"))
    assert gen == "<｜begin▁of▁sentence｜><|User|>: a cat\n\n<|Assistant|>:<begin_of_image>"


def test_hf_layout_loads_with_plain_transformers(tiny_hf_dir, tiny_hf):
    model = JanusForConditionalGeneration.from_pretrained(tiny_hf_dir)
    processor = JanusProcessor.from_pretrained(tiny_hf_dir)
    assert processor.use_default_system_prompt
    assert processor.num_image_tokens == 16
    ours = tiny_hf.model.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in model.state_dict().items())
    assert model.generation_config.generation_kwargs["boi_token_id"] == tiny_hf.special["boi"]


@pytest.mark.parametrize(("fmt", "weights"), [("hf", "safetensors"), ("deepseek", "bin"),
                                               ("deepseek", "safetensors"), ("hf", "bin")])
def test_sharded_checkpoints_load(tmp_path, tiny_hf, fmt, weights):
    out = write_tiny_model(tmp_path / "m", fmt, seed=0, shards=3, weights=weights)
    assert len(list(out.glob(f"*-of-00003.{weights}"))) == 3
    assert any(out.glob("*.index.json"))
    assert _same_weights(load_model(str(out), device="cpu"), tiny_hf)


def test_other_seed_gives_other_weights(tmp_path, tiny_hf):
    other = load_model(str(write_tiny_model(tmp_path / "s1", "hf", seed=1)), device="cpu")
    assert not _same_weights(other, tiny_hf)


def test_missing_weights_file(tmp_path, tiny_hf_dir):
    d = tmp_path / "m"
    shutil.copytree(tiny_hf_dir, d)
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(str(d))


def test_missing_shard_is_named(tmp_path):
    d = write_tiny_model(tmp_path / "m", "deepseek", shards=2)
    (d / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(ModelLoadError, match="pytorch_model-00002-of-00002.bin"):
        load_model(str(d))


def test_missing_weight_is_named_hf(tmp_path, tiny_hf_dir):
    d = tmp_path / "m"
    shutil.copytree(tiny_hf_dir, d)
    state = load_file(str(d / "model.safetensors"))
    del state["model.language_model.layers.1.mlp.down_proj.weight"]
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"missing weight\(s\): model\.language_model\.layers\.1\.mlp\.down_proj"):
        load_model(str(d))


def test_missing_and_unexpected_weights_are_named_deepseek(tmp_path):
    d = write_tiny_model(tmp_path / "m", "deepseek")
    state = {k: v.clone() for k, v in read_weights(d).items()}  # the loader memory-maps .bin files
    (d / "pytorch_model.bin").unlink()
    del state["gen_head.vision_head.weight"]
    state["gen_head.extra.weight"] = torch.zeros(2)
    torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError) as info:
        load_model(str(d))
    assert "model.generation_head.vision_head.weight" in str(info.value)
    assert "gen_head.extra.weight" in str(info.value)


def test_deepseek_config_without_sub_configs(tmp_path):
    d = write_tiny_model(tmp_path / "m", "deepseek")
    config = json.loads((d / "config.json").read_text())
    del config["gen_head_config"]
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="gen_head_config"):
        load_model(str(d))


def test_weight_renaming_round_trips(tiny_hf):
    state = tiny_hf.model.state_dict()
    original = deepseek.to_deepseek_state_dict(state)
    assert "vision_model.vision_tower.blocks.0.attn.qkv.weight" in original
    assert "gen_vision_model.decoder.conv_blocks.0.res.0.conv1.weight" in original
    assert "gen_vision_model.encoder.mid.1.q.weight" in original
    assert "aligner.layers.2.weight" in original and "gen_aligner.layers.0.bias" in original
    assert original["vision_model.vision_tower.pos_embed"].dim() == 3
    back = deepseek.to_hf_state_dict(original)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
