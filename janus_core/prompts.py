"""Janus-Pro prompt conventions shared by the tiny-model writer, the loader and the processor.

The chat format is DeepSeek's `deepseek` SFT format as Janus-Pro was trained on it:
    [system prompt]<|User|>: <image_placeholder>\\n{question}\\n\\n<|Assistant|>:
Understanding prepends the default system prompt (transformers' `JanusProcessor` does that when
`use_default_system_prompt` is set); generation uses an empty one and appends `<begin_of_image>`.
"""

from __future__ import annotations

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

# Our own Jinja rendering of the format above, in transformers' multimodal message shape:
# {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}.
# Each image becomes "<image_placeholder>\n" ahead of the text; turns are separated by "\n\n" after
# a user turn and by EOS after an assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set role = message['role'] | lower %}"
    "{% if role == 'user' %}<|User|>: "
    "{% elif role == 'assistant' %}<|Assistant|>: "
    "{% else %}{{ message['role'] | capitalize }}: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}"
    "{% for part in message['content'] if part['type'] == 'image' %}<image_placeholder>{{ '\\n' }}{% endfor %}"
    "{{ message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') | trim }}"
    "{% endif %}"
    "{% if role == 'assistant' %}" + EOS + "{% else %}{{ '\\n\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|>:{% endif %}"
)
