"""Janus-Pro prompt conventions shared by the tiny-model writer, the loader and the processor.

The chat format is DeepSeek's `deepseek` SFT format as Janus-Pro was trained on it:
    [system prompt]<|User|>: <image_placeholder>\\n{question}\\n\\n<|Assistant|>:
Understanding prepends the default system prompt (transformers' `JanusProcessor` does that when
`use_default_system_prompt` is set); generation uses an empty one and appends `<begin_of_image>`.
"""

from __future__ import annotations

from typing import Literal

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
IMAGE_TOKEN = "<image_placeholder>"
BOI_TOKEN = "<begin_of_image>"
EOI_TOKEN = "<end_of_image>"
USER = "<|User|>"
ASSISTANT = "<|Assistant|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN, "<patch_placeholder>", USER, ASSISTANT]
IMAGE_SPECIAL_TOKENS = {"image_token": IMAGE_TOKEN, "boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN}

ChatFormat = Literal["janus-pro", "janus"]
CHAT_FORMATS: tuple[str, ...] = ("janus-pro", "janus")
# The roles each family was trained with: Janus-Pro `<|User|>`; Janus-1.3B and JanusFlow-1.3B `User`.
ROLES: dict[str, tuple[str, str]] = {"janus-pro": (USER, ASSISTANT), "janus": ("User", "Assistant")}


def chat_template(fmt: str = "janus-pro") -> str:
    """Our own Jinja rendering of the format above, in transformers' multimodal message shape:
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}.

    A message's images go ahead of its text, each on its own line with a blank line between two
    images (as the template transformers' converter gives Janus-Pro renders them); text parts are
    joined with spaces; a user turn ends with "\\n\\n", an assistant turn with EOS; a system message
    is plain text and a blank line (DeepSeek's `system_template`), so it belongs first.
    """
    if fmt not in ROLES:
        raise ValueError(f"unknown chat format {fmt!r}; use one of {', '.join(CHAT_FORMATS)}")
    user, assistant = ROLES[fmt]
    return (
        "{% for message in messages %}"
        "{% set role = message['role'] | lower %}"
        f"{{% if role == 'user' %}}{user}: "
        f"{{% elif role == 'assistant' %}}{assistant}: "
        "{% endif %}"
        "{% if message['content'] is string %}{{ message['content'] | trim }}"
        "{% else %}"
        "{% for part in message['content'] if part['type'] == 'image' %}"
        "{% if not loop.first %}{{ '\\n' }}{% endif %}<image_placeholder>{{ '\\n' }}{% endfor %}"
        "{{ message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') | trim }}"
        "{% endif %}"
        "{% if role == 'assistant' %}" + EOS + "{% else %}{{ '\\n\\n' }}{% endif %}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{assistant}:{{% endif %}}"
    )


CHAT_TEMPLATE = chat_template("janus-pro")


def template_format(template: str | None) -> str | None:
    """Which family a chat template's roles belong to (None: neither is recognisable)."""
    if not template:
        return None
    if USER in template:
        return "janus-pro"
    if "User:" in template or "User" in template:
        return "janus"
    return None
