"""Tiny random Janus checkpoints for tests and offline try-outs.

`write_tiny_model` writes the real architecture at toy sizes (2 LM layers, 64x64 images, 4x4 = 16
image tokens, a VQ with the real 16x downsampling) plus a byte-level BPE tokenizer that carries the
real special tokens and a chat template. The same seed gives the same network in both
layouts: `hf` (what `JanusForConditionalGeneration.from_pretrained` reads) and `deepseek` (the
original `multi_modality` layout). `variant="janus"` writes a Janus-1.3B-style checkpoint: the same
network with `User:` / `Assistant:` roles (in its chat template for `hf`; for `deepseek`, which has
no template, the loader reads the family from the checkpoint's name, so name its directory after
Janus-1.3B or load it with `chat_format="janus"`). `image_size=384` gives Janus-Pro's real image
shapes (24x24 = 576 image tokens, 384x384 PNGs) on the same toy network: generation then takes the
real number of decode steps, which is what a long-running request needs in a test or a try-out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig,
    JanusConfig,
    JanusForConditionalGeneration,
    JanusProcessor,
    JanusVisionConfig,
    JanusVQVAEConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

from janus_core.models import deepseek
from janus_core.models.compat import pil_image_processor_class
from janus_core.text.prompts import (
    BOI_TOKEN,
    BOS,
    EOS,
    IMAGE_SPECIAL_TOKENS,
    IMAGE_TOKEN,
    PAD,
    SPECIAL_TOKENS,
    chat_template,
)

Format = Literal["hf", "deepseek"]
Variant = Literal["janus-pro", "janus"]

TINY_IMAGE_SIZE = 64
TINY_PATCH = 16
TINY_VOCAB = 512  # LM vocabulary; the tokenizer uses fewer ids, as the real one does (100015 of 102400)
TINY_NORM = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}

_CORPUS = [
    "Describe this image in detail.",
    "What is shown in the picture? A cat sits on a red chair next to a window.",
    "A photo of a mountain lake at sunrise, with mist over the water and pine trees.",
    "Generate an image of a futuristic city skyline at night with neon lights.",
    "The quick brown fox jumps over the lazy dog. How many animals are there?",
    "Please answer the question about the image: what color is the car?",
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language.",
    "A watercolor painting of a small boat, soft light, high detail, 4k, trending on artstation.",
    "0123456789 +-*/=()[]{}<>.,;:!?'\" hello world. the a an of to in is it that this with for on",
]


def build_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE tokenizer with Janus' special tokens (BOS added automatically)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 $B:1", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=SPECIAL_TOKENS[3:],
        extra_special_tokens=IMAGE_SPECIAL_TOKENS,
        model_max_length=1024,
        padding_side="left",
    )


def text_config(shape, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """The Llama config of a random checkpoint at `shape` (any object with vocab, lm_hidden, lm_intermediate,
    lm_layers, lm_heads and max_context: the benches' shapes, the tiny JanusFlow one)."""
    return LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.lm_hidden, intermediate_size=shape.lm_intermediate,
        num_hidden_layers=shape.lm_layers, num_attention_heads=shape.lm_heads, num_key_value_heads=shape.lm_heads,
        max_position_embeddings=shape.max_context, rms_norm_eps=1e-6, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )


def tiny_context(image_size: int) -> int:
    """The LM's context: 1,024 tokens for the tests' 64-pixel model (16 image tokens); 4,096 at Janus-Pro's
    384 pixels (576 image tokens), so the offline demo holds a conversation of several turns with an image
    (a random answer re-tokenizes to more tokens than it was generated as)."""
    return 1024 if image_size < 384 else 4096


def tiny_config(tokenizer: PreTrainedTokenizerFast, image_size: int = TINY_IMAGE_SIZE) -> JanusConfig:
    hidden = 64
    text = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=tiny_context(image_size),
        rms_norm_eps=1e-6,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    vision = JanusVisionConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2.0,
        image_size=image_size,
        patch_size=TINY_PATCH,
        projection_dim=hidden,
        depth=2,
        num_image_tokens=(image_size // TINY_PATCH) ** 2,
    )
    vq = JanusVQVAEConfig(
        embed_dim=8,
        num_embeddings=256,
        latent_channels=32,
        base_channels=32,  # GroupNorm(32) needs channels divisible by 32
        channel_multiplier=[1, 1, 2, 2, 4],  # four downsamples: the real 16x
        num_res_blocks=1,
        projection_dim=hidden,
        num_hidden_layers=2,
        image_token_embed_dim=hidden,
    )
    return JanusConfig(
        text_config=text,
        vision_config=vision,
        vq_config=vq,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        tie_word_embeddings=False,
    )


def generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    """Janus-Pro's defaults: CFG weight 5, temperature 1, and the ids transformers' image mode needs."""
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        guidance_scale=5.0,
        temperature=1.0,
        generation_kwargs={"boi_token_id": tokenizer.convert_tokens_to_ids(BOI_TOKEN)},
    )


# The LM's matrices (layers, heads, image-code embeddings) of a sharpened checkpoint are this many times
# larger: its greedy text and codes then depend on every input token, take many distinct values and
# sometimes stop at EOS, where the plain one repeats a few codes and never stops.
SHARP_SCALE = 10.0
_LM_PARTS = ("model.language_model.", "lm_head.", "model.generation_head.", "model.generation_embeddings.",
             "model.generation_aligner.")


def build_model(config: JanusConfig, seed: int, lm_scale: float = 1.0) -> JanusForConditionalGeneration:
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(config)
    # transformers' init leaves some tensors at exact zeros/ones; small noise everywhere makes the
    # toy model's outputs depend on every weight, so a mis-mapped weight changes the tokens.
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.add_(torch.randn_like(param) * 0.02)
            if lm_scale != 1.0 and param.dim() >= 2 and name.startswith(_LM_PARTS):
                param.mul_(lm_scale)
    return model.eval()


def _image_processor(image_size: int):
    return pil_image_processor_class()(size={"height": image_size, "width": image_size}, min_size=14,
                                  **TINY_NORM)


def write_tiny_model(
    out_dir: str | Path,
    fmt: Format = "hf",
    seed: int = 0,
    *,
    shards: int = 1,
    weights: Literal["safetensors", "bin"] | None = None,
    variant: Variant = "janus-pro",
    image_size: int = TINY_IMAGE_SIZE,
    sharp: bool = False,
) -> Path:
    """Write a tiny random Janus checkpoint with its tokenizer and processor files; returns the path.

    `sharp` scales the LM's weights by `SHARP_SCALE` (the oracle tests' checkpoint: outputs that use
    every input, many distinct tokens, and answers that end at EOS).
    """
    if variant not in ("janus-pro", "janus"):
        raise ValueError(f"unknown variant {variant!r}; use 'janus-pro' or 'janus'")
    if image_size < TINY_PATCH or image_size % TINY_PATCH:
        raise ValueError(f"image_size must be a positive multiple of {TINY_PATCH}, got {image_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = tiny_context(image_size)
    config = tiny_config(tokenizer, image_size)
    model = build_model(config, seed, SHARP_SCALE if sharp else 1.0)
    if fmt == "hf":
        _write_hf(out, model, tokenizer, shards, weights or "safetensors", chat_template(variant))
    elif fmt == "deepseek":
        _write_deepseek(out, model, tokenizer, shards, weights or "bin")
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}; use 'hf' or 'deepseek'")
    same_mode(out)
    return out


def same_mode(out: Path) -> None:
    """Every file readable as the umask allows (safetensors writes its file 0600 and the rest 0644)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in out.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _write_hf(out: Path, model, tokenizer, shards: int, weights: str, template: str) -> None:
    model.generation_config = generation_config(tokenizer)
    if shards > 1 or weights == "bin":
        model.config.save_pretrained(out)
        model.generation_config.save_pretrained(out)
        stem = "model" if weights == "safetensors" else "pytorch_model"
        _save_sharded(dict(model.state_dict()), out, shards, weights, stem)
    else:
        model.save_pretrained(out)
    processor = JanusProcessor(
        image_processor=_image_processor(model.config.vision_config.image_size),
        tokenizer=tokenizer,
        chat_template=template,
        use_default_system_prompt=True,
        num_image_tokens=model.config.vision_config.num_image_tokens,
    )
    processor.save_pretrained(out)


def _write_deepseek(out: Path, model, tokenizer, shards: int, weights: str) -> None:
    config = deepseek.to_deepseek_config(model.config)
    config["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    state = deepseek.to_deepseek_state_dict(model.state_dict())
    # The original checkpoints also carry weights the transformers model has no use for.
    width = model.config.vision_config.hidden_size
    state["vision_model.vision_tower.attn_pool.latent"] = torch.zeros(1, 1, width)
    state["vision_model.vision_tower.attn_pool.q.weight"] = torch.zeros(width, width)
    state["gen_vision_model.quantize.codebook_used"] = torch.zeros(model.config.vq_config.num_embeddings)
    _save_sharded(state, out, shards, weights, "pytorch_model" if weights == "bin" else "model")

    write_deepseek_processor(out, tokenizer, model.config.vision_config.image_size,
                             model.config.vision_config.num_image_tokens)


def write_deepseek_processor(out: Path, tokenizer, image_size: int, num_image_tokens: int) -> None:
    """Tokenizer and processor files as DeepSeek's original checkpoints ship them."""
    tokenizer.save_pretrained(out)
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    for key in ("extra_special_tokens", *IMAGE_SPECIAL_TOKENS):  # the originals lack them; the loader adds them
        tok_config.pop(key, None)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "VLMImageProcessor",
        "processor_class": "VLChatProcessor",
        "image_size": image_size,
        "min_size": 14,
        "background_color": [127, 127, 127],
        "do_normalize": True,
        "rescale_factor": 1 / 255,
        **TINY_NORM,
    }, indent=2))
    (out / "processor_config.json").write_text(json.dumps({
        "processor_class": "VLChatProcessor",
        "image_tag": IMAGE_TOKEN,
        "num_image_tokens": num_image_tokens,
        "sft_format": "deepseek",
        "add_special_token": False,
        "mask_prompt": True,
        "ignore_id": -100,
    }, indent=2))


def _save_sharded(state: dict[str, torch.Tensor], out: Path, shards: int, weights: str, stem: str) -> None:
    ext = "safetensors" if weights == "safetensors" else "bin"
    names = sorted(state)
    if shards <= 1:
        _save_one({k: state[k] for k in names}, out / f"{stem}.{ext}", ext)
        return
    per = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        chunk = names[i * per:(i + 1) * per]
        filename = f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        _save_one({k: state[k] for k in chunk}, out / filename, ext)
        weight_map.update(dict.fromkeys(chunk, filename))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": weight_map}
    (out / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))


def _save_one(state: dict[str, torch.Tensor], path: Path, ext: str) -> None:
    if ext == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    else:
        torch.save(state, path)
