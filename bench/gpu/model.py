"""Random-weight Janus models at benchmark shapes, built in memory on the target device.

No files and no hub: the network is constructed directly on the device in the target dtype (a 7B
in bf16 is ~15 GB and never exists in fp32 or on the host), transformers' own initialisation runs
there as GPU kernels (seconds, not minutes), and small noise on every weight keeps norms and biases
from being exact ones and zeros. The tokenizer is `janus_core.tiny.janus`'s byte-level one with the real
special tokens; the LM and image vocabularies are the real sizes of the shape, so every matrix and
KV row has its real shape, even though prompts only ever use the tokenizer's ~400 ids.

`stock_copy` is the reference's own copy, made before any engine sees the model (the engine packs
CPU fp32 linears in place). This module knows shapes and weights, not timing.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import JanusConfig, JanusForConditionalGeneration, JanusProcessor

from bench.models import SHAPES, lm_weight_bytes, shape_config, write_once
from janus_core.models.compat import pil_image_processor_class
from janus_core.models.loader import LoadedModel, special_ids
from janus_core.text.prompts import CHAT_TEMPLATE
from janus_core.tiny.janus import TINY_NORM, build_tokenizer, generation_config, tiny_config

log = logging.getLogger(__name__)

# Short names on the command line -> bench.models shapes ("tiny" is janus_core.tiny.janus's test model).
SHAPE_NAMES = {"tiny": "tiny", "mid": "mid", "1b": "janus-pro-1b", "7b": "janus-pro-7b"}


def resolve_shape(name: str) -> str:
    """A short or long shape name -> its short name; ValueError naming the choices otherwise."""
    for short, long in SHAPE_NAMES.items():
        if name in (short, long):
            return short
    raise ValueError(f"unknown shape {name!r}; choose from {', '.join(SHAPE_NAMES)}")


def shape_janus_config(shape: str, tokenizer) -> JanusConfig:
    if shape == "tiny":
        return tiny_config(tokenizer)
    return shape_config(SHAPES[SHAPE_NAMES[shape]], tokenizer)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_random_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LoadedModel:
    """A `LoadedModel` of `shape` with random weights, constructed on `device` in `dtype`."""
    tokenizer = build_tokenizer()
    config = shape_janus_config(shape, tokenizer)
    torch.manual_seed(seed)
    try:
        with _default_dtype(dtype), torch.device(device):
            model = JanusForConditionalGeneration(config)
    except Exception as exc:  # an init this torch cannot run in `dtype` there: build in fp32, then cast
        log.warning("constructing in %s on %s failed (%s); building in float32 and casting", dtype, device, exc)
        with torch.device(device):
            model = JanusForConditionalGeneration(config).to(dtype)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param), alpha=0.02)
    model.generation_config = generation_config(tokenizer)
    model.eval()
    vision = config.vision_config
    processor = JanusProcessor(
        image_processor=pil_image_processor_class()(
            size={"height": vision.image_size, "width": vision.image_size}, min_size=14, **TINY_NORM),
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE, use_default_system_prompt=True,
        num_image_tokens=vision.num_image_tokens,
    )
    processor.num_image_tokens = vision.num_image_tokens  # transformers 5.0 ignores the argument (always 576)
    return LoadedModel(model, processor, Path(f"random-{shape}"), "random", torch.device(device), dtype,
                       special_ids(tokenizer))


def stock_copy(lm: LoadedModel) -> LoadedModel:
    """The same weights in a separate module tree, for the references: nothing the engine does reaches it."""
    return dataclasses.replace(lm, model=copy.deepcopy(lm.model))


def kv_bytes_per_token(lm: LoadedModel) -> int:
    """2 (K and V) x layers x KV heads x head dim x dtype bytes."""
    cfg = lm.model.config.text_config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * lm.dtype.itemsize


def _param_bytes(*modules: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def step_weight_bytes(lm: LoadedModel, kind: str) -> int:
    """Weight bytes one decode step of `kind` must read: the LM layers, final norm and that kind's head."""
    if kind == "generate":
        return lm_weight_bytes(lm.model)
    core = lm.model.model.language_model
    return _param_bytes(core.layers, core.norm, lm.model.lm_head)


def parameter_count(lm: LoadedModel) -> int:
    return sum(p.numel() for p in lm.model.parameters())


def write_random_checkpoint(shape: str, out: str | Path, device: torch.device, dtype: torch.dtype,
                            seed: int = 0) -> Path:
    """`build_random_model` saved in transformers' layout (for a server to load): built on `device` in `dtype`,
    so a 1B checkpoint on a GPU box takes seconds and half the disk of `bench.models.write_model`'s fp32."""
    def write(folder: Path) -> None:
        lm = build_random_model(resolve_shape(shape), device, dtype, seed)
        lm.model.save_pretrained(folder)
        lm.processor.save_pretrained(folder)

    return write_once(out, write)


if __name__ == "__main__":
    import argparse

    from janus_core.models.device import resolve_device, resolve_dtype

    parser = argparse.ArgumentParser(description="write a random checkpoint of a shape, built on the device")
    parser.add_argument("out")
    parser.add_argument("--shape", default="1b", help=", ".join(SHAPE_NAMES))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    print(write_random_checkpoint(args.shape, args.out, device, resolve_dtype(args.dtype, device)))
