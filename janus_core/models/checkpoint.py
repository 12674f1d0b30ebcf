"""Checkpoint files shared by every layout: weights (safetensors or pickle, sharded or not), JSON files,
the state-dict check against an architecture, and transformers' processor built from DeepSeek's files.

Both loaders (`janus_core.models.loader` for Janus and Janus-Pro, `janus_core.models.janusflow`)
read checkpoints through this module; neither imports the other's internals.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, JanusProcessor, PretrainedConfig
from transformers.utils import is_torchvision_available

from janus_core.errors import ModelLoadError
from janus_core.models.compat import pil_image_processor_class
from janus_core.text.prompts import IMAGE_SPECIAL_TOKENS


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read every weight of a checkpoint directory: safetensors or pickle `.bin`, sharded or not."""
    for stem, ext in (("model", "safetensors"), ("pytorch_model", "bin"), ("model", "bin")):
        index = path / f"{stem}.{ext}.index.json"
        if index.exists():
            weight_map = read_json(index, "the weight index").get("weight_map", {})
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (path / f).exists()]
            if missing:
                raise ModelLoadError(f"{index} names shard(s) that are missing: {missing}")
            state: dict[str, torch.Tensor] = {}
            for f in files:
                state.update(_read_weight_file(path / f))
            return state
        single = path / f"{stem}.{ext}"
        if single.exists():
            return _read_weight_file(single)
    raise ModelLoadError(f"no weights in {path}: expected model.safetensors, pytorch_model.bin or a sharded index")


def _read_weight_file(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            return load_file(str(file))
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot read weights from {file}: {exc}") from exc


def check_state_dict(skeleton: torch.nn.Module, state: dict[str, torch.Tensor], tied: bool, path: Path,
                     architecture: str) -> None:
    """Refuse a checkpoint whose weight names differ from the architecture's (`skeleton`, on the meta device)."""
    expected = set(skeleton.state_dict().keys())
    missing = sorted(expected - state.keys() - ({"lm_head.weight"} if tied else set()))
    unexpected = sorted(state.keys() - expected)
    problems = []
    if missing:
        problems.append(f"missing weight(s): {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected weight(s): {_preview(unexpected)}")
    if problems:
        raise ModelLoadError(f"checkpoint {path} does not match the {architecture} architecture: "
                             + "; ".join(problems))


def _preview(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _image_processor_class():
    if is_torchvision_available():
        from transformers import JanusImageProcessor

        return JanusImageProcessor
    return pil_image_processor_class()


def deepseek_processor(path: Path) -> JanusProcessor:
    """Build transformers' processor from the original `VLChatProcessor` files."""
    pre = read_json(path / "preprocessor_config.json", "the image preprocessor config")
    proc = read_json(path / "processor_config.json", "the processor config")
    size = int(pre.get("image_size", 384))
    kwargs: dict[str, Any] = {"size": {"height": size, "width": size}}
    for key in ("image_mean", "image_std", "min_size", "rescale_factor", "do_normalize"):
        if key in pre:
            kwargs[key] = pre[key]
    try:
        # An empty config: transformers would read config.json, whose `multi_modality` it warns about
        tokenizer = AutoTokenizer.from_pretrained(path, config=PretrainedConfig(),
                                                  extra_special_tokens=IMAGE_SPECIAL_TOKENS)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer from {path}: {exc}") from exc
    return JanusProcessor(
        image_processor=_image_processor_class()(**kwargs),
        tokenizer=tokenizer,
        use_default_system_prompt=True,
        num_image_tokens=int(proc.get("num_image_tokens", 576)),
    )


def read_json(file: Path, what: str) -> dict[str, Any]:
    if not file.exists():
        raise ModelLoadError(f"{what} is missing: {file} does not exist")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{file} ({what}) is not valid JSON: {exc}") from exc
