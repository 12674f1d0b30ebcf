"""Prompt building exactly as the reference does it, on top of transformers' `JanusProcessor`.

Understanding: default system prompt + `<|User|>: <image_placeholder>\\n{prompt}\\n\\n<|Assistant|>:`,
each image expanded to begin + N placeholders + end, images padded to square with the mean colour,
resized and normalised by the image processor. Generation: the same chat format with an empty
system prompt, ending in `<begin_of_image>`. Conversations (`janus_core.text.conversation`) render the
same way, every turn in order. This module knows tokens and pixels, not sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

from janus_core.errors import InvalidRequestError
from janus_core.models.loader import LoadedModel
from janus_core.text.conversation import Message, check_conversation, expand_images, system_text, template_messages
from janus_core.text.prompts import BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN

_RESERVED = (IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN)


@dataclass
class UnderstandingInputs:
    input_ids: list[int]
    pixel_values: torch.Tensor | None  # (num_images, 3, H, W) float32, normalised


def _check_prompt(prompt: str) -> None:
    if not isinstance(prompt, str):
        raise InvalidRequestError("prompt must be a string")
    for token in _RESERVED:
        if token in prompt:
            raise InvalidRequestError(f"prompt must not contain the reserved token {token}")


def conversation(prompt: str, num_images: int) -> list[dict]:
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": prompt}]
    return [{"role": "user", "content": content}]


def understanding_text(lm: LoadedModel, prompt: str, num_images: int) -> str:
    """The chat-formatted text before the processor adds the system prompt and expands images."""
    _check_prompt(prompt)
    return lm.processor.apply_chat_template(conversation(prompt, num_images), add_generation_prompt=True)


def build_understanding_inputs(lm: LoadedModel, images: Sequence[Image.Image], prompt: str) -> UnderstandingInputs:
    text = understanding_text(lm, prompt, len(images))
    batch = lm.processor(text=text, images=list(images) or None, generation_mode="text", return_tensors="pt")
    pixels = batch.get("pixel_values")
    return UnderstandingInputs(batch["input_ids"][0].tolist(), pixels.float() if pixels is not None else None)


def build_text_inputs(lm: LoadedModel, prompt: str | None = None,
                      ids: Sequence[int] | None = None) -> UnderstandingInputs:
    """A plain completion's prompt, no chat format: text tokenized as the tokenizer does by default (BOS first),
    or token ids as given. Image placeholders are refused: a plain prompt has no images."""
    if ids is None:
        _check_prompt(prompt)
        ids = lm.tokenizer(prompt)["input_ids"]
    else:
        vocab = int(lm.model.config.text_config.vocab_size)
        bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"prompt token id {bad!r} is outside the vocabulary (0 to {vocab - 1})")
        if lm.special["image"] in ids:
            raise InvalidRequestError(f"prompt token ids must not contain the image placeholder id "
                                      f"{lm.special['image']}; a plain completion has no images")
    if not ids:
        raise InvalidRequestError("the prompt is empty")
    return UnderstandingInputs(list(ids), None)


def conversation_text(lm: LoadedModel, messages: Sequence[Message]) -> str:
    """The whole conversation as prompt text (system block, every turn, the generation prompt)."""
    check_conversation(messages)
    turns = lm.processor.apply_chat_template(template_messages(messages), add_generation_prompt=True)
    default = DEFAULT_SYSTEM_PROMPT if lm.processor.use_default_system_prompt else None
    return system_text(messages, default) + turns


def build_conversation_inputs(lm: LoadedModel, messages: Sequence[Message],
                              images: Sequence[Image.Image]) -> UnderstandingInputs:
    """Ids and pixels of a conversation; `images` are all of its images in order."""
    wanted = sum(m.num_images for m in messages)
    if wanted != len(images):
        raise InvalidRequestError(f"the messages refer to {wanted} image(s) but {len(images)} were given")
    # Expanded and tokenized here rather than by the processor's __call__, which would put its own
    # default system prompt in front of a client's.
    text = expand_images(conversation_text(lm, messages), lm.num_image_tokens)
    ids = lm.tokenizer(text)["input_ids"]
    pixels = None
    if images:
        pixels = lm.processor.image_processor(list(images), return_tensors="pt")["pixel_values"].float()
    return UnderstandingInputs(list(ids), pixels)


def build_generation_ids(lm: LoadedModel, prompt: str) -> list[int]:
    _check_prompt(prompt)
    text = lm.processor.apply_chat_template(conversation(prompt, 0), add_generation_prompt=True)
    batch = lm.processor(text=text, generation_mode="image", return_tensors="pt")
    return batch["input_ids"][0].tolist()


def unconditional_ids(lm: LoadedModel, ids: Sequence[int]) -> list[int]:
    """The CFG row: every token but BOS and `<begin_of_image>` replaced by pad (as the reference does)."""
    keep = {lm.special["bos"], lm.special["boi"]}
    return [t if t in keep else lm.special["pad"] for t in ids]
