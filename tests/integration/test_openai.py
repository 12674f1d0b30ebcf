"""The OpenAI-compatible routes, driven by the official `openai` Python client."""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest
from PIL import Image

from tests.integration.conftest import b64, png_bytes

DATA_URL = "data:image/png;base64," + b64(png_bytes())


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def _vision_message(text: str, url: str = DATA_URL) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def test_chat_completion_with_image_equals_native_route(server, client, model):
    reply = client.chat.completions.create(model=model, messages=_vision_message("What is this?"), max_tokens=10,
                                           temperature=0)
    native = httpx.post(server.url + "/v1/understand", json={"prompt": "What is this?", "images": [b64(png_bytes())],
                                                             "max_new_tokens": 10}, timeout=60).json()
    assert reply.choices[0].message.content == native["text"]
    assert reply.choices[0].finish_reason == native["finish_reason"]
    assert reply.usage.completion_tokens == native["usage"]["completion_tokens"]
    assert reply.object == "chat.completion"


def test_chat_completion_stream(client, model):
    stream = client.chat.completions.create(model=model, messages=_vision_message("Describe"), max_tokens=8,
                                            temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    full = client.chat.completions.create(model=model, messages=_vision_message("Describe"), max_tokens=8,
                                          temperature=0)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_chat_completion_text_only(client, model):
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=4)
    assert reply.usage.prompt_tokens > 0


def test_chat_refuses_remote_urls(client, model):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=_vision_message("x", "https://example.com/cat.png"))
    assert "remote image URLs are refused" in str(info.value)


def test_images_generate_b64(client, model):
    result = client.images.generate(model=model, prompt="a lighthouse", n=2, response_format="b64_json")
    assert len(result.data) == 2
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.size == (64, 64)


def test_images_generate_refuses_other_sizes(client, model):
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(model=model, prompt="a lighthouse", size="1024x1024")
    assert "64x64" in str(info.value)
    with pytest.raises(openai.BadRequestError):
        client.images.generate(model=model, prompt="a lighthouse", response_format="url")


def test_models_list(client, server):
    assert [m.object for m in client.models.list().data] == ["model"]
