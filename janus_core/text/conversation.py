"""Conversations: an ordered list of system / user / assistant messages -> one understanding prompt.

A `Message` carries its text and how many images it holds (the images themselves travel in one
flat list, in conversation order). Rendering follows DeepSeek's `deepseek` SFT format, which both
Janus-1.3B and Janus-Pro were trained on:

    {system}\\n\\n{User}: <image_placeholder>\\n{question}\\n\\n{Assistant}: {answer}<eos>{User}: ...{Assistant}:

- the system text comes first, as plain text followed by a blank line (where transformers'
  `JanusProcessor` puts its default system prompt); a client's system message replaces the
  default one there; several system messages are joined with a newline;
- the turns themselves are rendered by the checkpoint's chat template (`processor.chat_template`:
  the checkpoint's own, or ours for the chat format in use), so the roles are `<|User|>` /
  `<|Assistant|>` (Janus-Pro) or `User` / `Assistant` (Janus-1.3B);
- each image of a message becomes `<image_placeholder>\\n` ahead of its text, then begin + N
  placeholders + end tokens.

This module knows the message rules and the prompt text; not how messages arrive (HTTP, gRPC) or
what the model does with the ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from janus_core.errors import InvalidRequestError
from janus_core.text.prompts import BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")
_RESERVED = (IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN)


@dataclass(frozen=True)
class Message:
    role: str
    text: str = ""
    num_images: int = 0  # images of this message, taken in order from the conversation's image list


def check_conversation(messages: Sequence[Message]) -> None:
    """Raise `InvalidRequestError` naming the first message that breaks a rule."""
    if not messages:
        raise InvalidRequestError("messages must not be empty")
    seen_turn = False
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise InvalidRequestError(f"messages[{i}].role is {m.role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m.text, str):
            raise InvalidRequestError(f"messages[{i}] text must be a string")
        for token in _RESERVED:
            if token in m.text:
                raise InvalidRequestError(f"messages[{i}] must not contain the reserved token {token}")
        if m.num_images < 0:
            raise InvalidRequestError(f"messages[{i}] has a negative image count")
        if m.role == "system":
            if seen_turn:
                raise InvalidRequestError(f"messages[{i}]: system messages must come before the first user message")
            if m.num_images:
                raise InvalidRequestError(f"messages[{i}]: only user messages may carry images")
            continue
        seen_turn = True
        if m.role == "assistant" and m.num_images:
            raise InvalidRequestError(f"messages[{i}]: only user messages may carry images")
        if m.role == "user" and not m.text.strip() and not m.num_images:
            raise InvalidRequestError(f"messages[{i}]: a user message needs text or an image")
    if messages[-1].role != "user":
        raise InvalidRequestError(f"the last message must be from the user, not {messages[-1].role!r} "
                                  "(the answer to it is what gets generated)")


def template_messages(messages: Sequence[Message]) -> list[dict]:
    """The non-system turns in transformers' multimodal message shape, for `apply_chat_template`."""
    out = []
    for m in messages:
        if m.role == "system":
            continue
        content: list[dict] = [{"type": "image"} for _ in range(m.num_images)]
        content.append({"type": "text", "text": m.text})
        out.append({"role": m.role, "content": content})
    return out


def system_text(messages: Sequence[Message], default: str | None) -> str:
    """The system block the prompt starts with ("" for none); `default` applies when no message sets one."""
    given = [m.text.strip() for m in messages if m.role == "system"]
    if given:
        text = "\n".join(t for t in given if t)
        return f"{text}\n\n" if text else ""
    return default or ""


def expand_images(text: str, num_image_tokens: int) -> str:
    """Each `<image_placeholder>` -> begin + N placeholders + end, as the processor expands them."""
    return text.replace(IMAGE_TOKEN, BOI_TOKEN + IMAGE_TOKEN * num_image_tokens + EOI_TOKEN)
