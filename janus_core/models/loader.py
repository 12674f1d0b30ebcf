"""Model loading: a local directory or hub id, in transformers' layout or DeepSeek's original one.

`load_model` returns a `LoadedModel`: the transformers `JanusForConditionalGeneration` on its
device and dtype, a `JanusProcessor` configured to prompt exactly as the official checkpoints do,
and a few derived facts the runtime needs. Errors name the missing file or weight.

Chat format: the checkpoint's own chat template when it has one; otherwise ours, with the roles of
the model's family (`janus`: Janus-1.3B's and JanusFlow's `User:` / `Assistant:`; `janus-pro`: `<|User|>` /
`<|Assistant|>`), read from the checkpoint's name (a hub id or a directory such as
`models--deepseek-ai--Janus-1.3B`). `chat_format=` overrides both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    JanusConfig,
    JanusForConditionalGeneration,
    JanusProcessor,
)
from transformers.utils import logging as hf_logging

from janus_core.errors import ModelLoadError
from janus_core.models import deepseek
from janus_core.models.checkpoint import check_state_dict, deepseek_processor, read_json, read_weights
from janus_core.models.device import resolve_device, resolve_dtype
from janus_core.models.janusflow_net import is_flow_config
from janus_core.models.quantize import check_quantization, place
from janus_core.text.prompts import (
    BOI_TOKEN,
    CHAT_FORMATS,
    EOI_TOKEN,
    IMAGE_TOKEN,
    PAD,
    chat_template,
    template_format,
)

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: JanusForConditionalGeneration
    processor: JanusProcessor
    path: Path
    format: str
    device: torch.device
    dtype: torch.dtype
    special: dict[str, int] = field(default_factory=dict)
    chat_format: str = "janus-pro"  # the roles prompts use: "janus-pro" or "janus" (Janus-1.3B)
    generator: str = "vq"  # the image generator: "vq" (Janus-Pro's codes) or "flow" (JanusFlow's rectified flow)
    image_lead: int = 0  # positions before an image's placeholders that its features cover (JanusFlow: 1)
    flow: Any = None  # janus_core.models.janusflow.FlowParts for a flow model
    quantization: str = "none"  # the LM's linears and heads: "none", "int8" or "fp8" (janus_core.models.quantize)
    weights_bytes: int = 0  # what the weights hold on the device, quantized ones at their stored size
    load_peak_bytes: int | None = None  # CUDA: the allocator's peak while the weights were placed

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def num_image_tokens(self) -> int:
        return int(self.model.config.vision_config.num_image_tokens)

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    @property
    def max_context(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    @property
    def name(self) -> str:
        return self.path.name


def resolve_model_path(model: str) -> Path:
    """A local directory as is; otherwise a hub id fetched (or found in the local cache) by huggingface_hub."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"model path {model!r} is a file; pass the checkpoint's directory")
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelLoadError(f"model directory {model!r} does not exist (and it is not a hub id like org/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model))
    except Exception as exc:  # offline, unknown repo, auth: all mean "cannot get it"
        raise ModelLoadError(
            f"model {model!r} is not a local directory and could not be fetched from the hub: {exc}"
        ) from exc


def detect_format(path: Path) -> str:
    config = read_json(path / "config.json", "the model's config")
    if deepseek.is_deepseek_config(config):
        return "deepseek"
    if config.get("model_type") == "janus":
        return "hf"
    raise ModelLoadError(
        f"{path / 'config.json'} has model_type {config.get('model_type')!r}; expected 'janus' "
        "(transformers layout) or 'multi_modality' (DeepSeek's original layout)"
    )


def family_from_name(*names: str) -> str:
    """The chat format a checkpoint's name implies: Janus-1.3B and JanusFlow-1.3B (whose examples use
    `User` / `Assistant`) -> "janus"; anything else "janus-pro"."""
    text = " ".join(names).lower().replace("_", "-")
    return "janus" if "janus-1.3b" in text or "janusflow" in text else "janus-pro"


def _apply_chat_format(processor: JanusProcessor, model: str, path: Path, chat_format: str | None) -> str:
    if chat_format is not None:
        if chat_format not in CHAT_FORMATS:
            raise ModelLoadError(f"unknown chat format {chat_format!r}; use one of {', '.join(CHAT_FORMATS)}")
        processor.chat_template = chat_template(chat_format)
        return chat_format
    family = family_from_name(model, str(path.resolve()))
    if processor.chat_template:
        return template_format(processor.chat_template) or family
    processor.chat_template = chat_template(family)
    return family


def load_model(model: str, device: str = "auto", dtype: str = "auto", chat_format: str | None = None,
               vae: str | None = None, quantization: str = "none") -> LoadedModel:
    """`vae`: JanusFlow only (see `janus_core.models.janusflow`); `quantization`: see
    `janus_core.models.quantize` (the weights are quantized as they move to the device)."""
    hf_logging.disable_progress_bar()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    check_quantization(quantization, dev, dt)
    path = resolve_model_path(model)
    fmt = detect_format(path)
    raw = read_json(path / "config.json", "the model's config")
    flow = None
    if fmt == "deepseek" and is_flow_config(raw):
        from janus_core.models.janusflow import load_janusflow

        net, processor, flow = load_janusflow(path, raw, dev, dt, vae)
        # JanusFlow's examples use Janus-1.3B's `User:` roles, whatever the directory is called
        chat_format = chat_format or ("janus" if not processor.chat_template else None)
    elif fmt == "hf":
        processor = _hf_processor(path)
        state = read_weights(path)
        config = JanusConfig.from_pretrained(path)
        net = _instantiate(config, state, dt, path)
    else:
        processor = deepseek_processor(path)
        state = deepseek.to_hf_state_dict(read_weights(path))
        config = deepseek.to_janus_config(
            read_json(path / "config.json", "the model's config"),
            image_token_id=processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
            tie_word_embeddings="lm_head.weight" not in state,
        )
        net = _instantiate(config, state, dt, path)
    state = None  # the weights live in `net` alone now: quantizing frees each full-precision one
    _check_processor(processor, net.config, path)
    fmt_chat = _apply_chat_format(processor, model, path, chat_format)
    if flow is None:
        net.generation_config = _generation_config(processor, path)
    placed = place(net, dev, quantization)
    net.eval()
    generator = "vq" if flow is None else "flow"
    log.info("loaded %s (%s layout, %s generator, %s chat format) on %s as %s%s", path, fmt, generator, fmt_chat, dev,
             dt, "" if quantization == "none" else f" with {quantization} linears")
    return LoadedModel(net, processor, path, fmt, dev, dt, special_ids(processor.tokenizer), fmt_chat,
                       generator=generator, image_lead=0 if flow is None else 1, flow=flow, quantization=quantization,
                       weights_bytes=placed.weights_bytes, load_peak_bytes=placed.load_peak_bytes)


def special_ids(tok) -> dict[str, int]:
    """The ids the runtime looks up by name: bos, eos, pad, image, boi (begin of image), eoi."""
    return {
        "bos": tok.bos_token_id,
        "eos": tok.eos_token_id,
        "pad": tok.convert_tokens_to_ids(PAD) if tok.pad_token_id is None else tok.pad_token_id,
        "image": tok.convert_tokens_to_ids(IMAGE_TOKEN),
        "boi": tok.convert_tokens_to_ids(BOI_TOKEN),
        "eoi": tok.convert_tokens_to_ids(EOI_TOKEN),
    }


def _instantiate(config: JanusConfig, state: dict[str, torch.Tensor], dtype: torch.dtype, path: Path):
    with torch.device("meta"):
        skeleton = JanusForConditionalGeneration(config)
    check_state_dict(skeleton, state, config.tie_word_embeddings, path, "Janus")
    try:
        model = JanusForConditionalGeneration.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the weights of {path}: {exc}") from exc
    return model


# --- processor ------------------------------------------------------------------------------------


def _hf_processor(path: Path) -> JanusProcessor:
    try:
        processor = JanusProcessor.from_pretrained(path)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the processor/tokenizer from {path}: {exc}") from exc
    return processor


def _check_processor(processor: JanusProcessor, config: JanusConfig, path: Path) -> None:
    tok = processor.tokenizer
    for token in (IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN):
        if tok.convert_tokens_to_ids(token) in (None, tok.unk_token_id):
            raise ModelLoadError(f"the tokenizer in {path} lacks the special token {token}")
    if tok.convert_tokens_to_ids(IMAGE_TOKEN) != config.image_token_id:
        raise ModelLoadError(
            f"config image_token_id {config.image_token_id} differs from the tokenizer's id for {IMAGE_TOKEN}"
        )
    if processor.num_image_tokens != config.vision_config.num_image_tokens:
        raise ModelLoadError(
            f"processor expands images to {processor.num_image_tokens} tokens but the vision model makes "
            f"{config.vision_config.num_image_tokens}"
        )


def _generation_config(processor: JanusProcessor, path: Path) -> GenerationConfig:
    """Make sure transformers' image mode has the ids it needs (pad and begin-of-image)."""
    gen = GenerationConfig.from_pretrained(path) if (path / "generation_config.json").exists() else GenerationConfig()
    tok = processor.tokenizer
    gen.bos_token_id = tok.bos_token_id
    gen.eos_token_id = tok.eos_token_id
    if gen.pad_token_id is None:
        gen.pad_token_id = tok.convert_tokens_to_ids(PAD)
    extra = dict(getattr(gen, "generation_kwargs", None) or {})
    extra.setdefault("boi_token_id", tok.convert_tokens_to_ids(BOI_TOKEN))
    gen.generation_kwargs = extra
    if gen.guidance_scale is None:
        gen.guidance_scale = 5.0
    return gen
