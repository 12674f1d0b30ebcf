"""Conversations and the OpenAI details clients rely on, against a real `janus-server serve`.

The oracle is transformers: the tiny checkpoint's own chat template renders the conversation
(`JanusProcessor.apply_chat_template`) and `generate` answers it greedily. The same conversation
goes through the OpenAI SDK, /v1/understand `messages` and gRPC.
"""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image
from transformers import JanusForConditionalGeneration, JanusProcessor

from server.rpc.client import JanusClient
from server.rpc.gen.janus.v1 import janus_pb2
from tests.support.servers import start_server

SYSTEM = "You describe pictures briefly."
ANSWER = "A red square on a blue field."
MAX = 12


def _png(image: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **save)
    return buf.getvalue()


def _url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


PICTURE = Image.fromarray((np.random.RandomState(7).rand(40, 56, 3) * 255).astype("uint8"))
PICTURE_PNG = _png(PICTURE)


def openai_turns(system: str | None = SYSTEM, url: str = _url(PICTURE_PNG)) -> list[dict]:
    head = [{"role": "system", "content": system}] if system is not None else []
    return head + [
        {"role": "user", "content": [{"type": "text", "text": "What is in this image?"},
                                     {"type": "image_url", "image_url": {"url": url, "detail": "low"}}]},
        {"role": "assistant", "content": ANSWER},
        {"role": "user", "content": "What colour is it?"},
    ]


@pytest.fixture(scope="module")
def oracle(tiny_hf_dir):
    model = JanusForConditionalGeneration.from_pretrained(tiny_hf_dir).eval()

    def answer(turns: list[dict], images: list[Image.Image], path=tiny_hf_dir) -> tuple[str, int]:
        """transformers' text and prompt length for `turns` (transformers' message shape)."""
        net = model if path == tiny_hf_dir else JanusForConditionalGeneration.from_pretrained(path).eval()
        processor = JanusProcessor.from_pretrained(path)
        if turns[0]["role"] == "system":
            processor.use_default_system_prompt = False  # the template places the client's system text
        text = processor.apply_chat_template(turns, add_generation_prompt=True)
        inputs = processor(text=text, images=images or None, return_tensors="pt")
        with torch.inference_mode():
            out = net.generate(**inputs, max_new_tokens=MAX, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:]
        return processor.tokenizer.decode(new, skip_special_tokens=True), inputs["input_ids"].shape[1]

    return answer


def hf_turns(system: str | None = SYSTEM) -> list[dict]:
    head = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system is not None else []
    return head + [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]},
        {"role": "user", "content": [{"type": "text", "text": "What colour is it?"}]},
    ]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


@pytest.mark.parametrize("system", [SYSTEM, None])
def test_three_turns_equal_transformers_on_every_surface(server, client, model, oracle, system):
    expected, prompt_tokens = oracle(hf_turns(system), [PICTURE])
    reply = client.chat.completions.create(model=model, messages=openai_turns(system), max_tokens=MAX, temperature=0)
    assert reply.choices[0].message.content == expected
    assert reply.usage.prompt_tokens == prompt_tokens

    native = httpx.post(server.url + "/v1/understand", timeout=60, json={
        "messages": openai_turns(system), "max_new_tokens": MAX}).json()
    assert native["text"] == expected and native["usage"]["prompt_tokens"] == prompt_tokens

    turns = ([{"role": "system", "text": system}] if system else []) + [
        {"role": "user", "text": "What is in this image?", "images": [PICTURE_PNG]},
        {"role": "assistant", "text": ANSWER}, {"role": "user", "text": "What colour is it?"}]
    with JanusClient(f"127.0.0.1:{server.grpc_port}", timeout=60) as grpc_client:
        answer = grpc_client.converse(turns, max_new_tokens=MAX)
    assert answer.text == expected and answer.prompt_tokens == prompt_tokens


def test_grpc_refuses_both_forms(server):
    import grpc

    with JanusClient(f"127.0.0.1:{server.grpc_port}", timeout=60) as grpc_client:
        with pytest.raises(grpc.RpcError) as info:
            grpc_client._stub.Understand(janus_pb2.UnderstandRequest(
                prompt="q", messages=[janus_pb2.Message(role="user", text="x")]), timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not both" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            grpc_client.converse([{"role": "user", "text": "x"}, {"role": "assistant", "text": "y"}])
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "last message" in info.value.details()


def test_understand_takes_exactly_one_form(server):
    both = {"prompt": "q", "images": [base64.b64encode(PICTURE_PNG).decode()], "messages": openai_turns()}
    r = httpx.post(server.url + "/v1/understand", json=both, timeout=30)
    assert r.status_code == 422 and "not both" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/understand", json={"max_new_tokens": 4}, timeout=30)
    assert r.status_code == 422 and "required" in r.json()["error"]["message"]


def test_stream_usage_only_when_asked(client, model):
    chunks = list(client.chat.completions.create(model=model, messages=openai_turns(), max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(client.chat.completions.create(model=model, messages=openai_turns(), max_tokens=6, temperature=0,
                                                stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_strings(client, model):
    free = client.chat.completions.create(model=model, messages=openai_turns(), max_tokens=MAX, temperature=0)
    text = free.choices[0].message.content
    assert len(text) >= 4, text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    for stream in (False, True):
        reply = client.chat.completions.create(model=model, messages=openai_turns(), max_tokens=MAX, temperature=0,
                                               stop=[stop], stream=stream)
        if stream:
            chunks = list(reply)
            got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = chunks[-1].choices[0].finish_reason
        else:
            got, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
        assert got == text[:text.index(stop)] and finish == "stop"


@pytest.mark.parametrize(("extra", "message"), [
    ({"n": 2}, "n=2 is not supported"),
    ({"logprobs": True}, "logprobs are not supported"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"presence_penalty": 0.3, "frequency_penalty": 0.2}, "presence_penalty is not supported (use repetition_penalty); "
                                                          "frequency_penalty is not supported"),
    ({"logit_bias": {"5": 2.0}}, "logit_bias is not supported"),
    ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
    ({"response_format": {"type": "json_object"}}, "response_format 'json_object'"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
])
def test_unsupported_options_are_400(client, model, extra, message):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=openai_turns(), max_tokens=4, **extra)
    assert message in str(info.value)


@pytest.mark.parametrize(("messages", "message"), [
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}],
     "input_audio"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _url(PICTURE_PNG),
                                                                        "detail": "ultra"}}]}], "detail"),
    ([{"role": "tool", "content": "x", "tool_call_id": "1"}], "role"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "last message must be from the user"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _url(PICTURE_PNG)}}] * 3},
      {"role": "assistant", "content": "ok"},
      {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _url(PICTURE_PNG)}}] * 2}],
     "the conversation has 5 images; at most 4"),
])
def test_bad_conversations_are_400(client, model, messages, message):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=messages, max_tokens=4)
    assert message in str(info.value)


def test_context_limit_names_the_numbers(client, model):
    long = [{"role": "user", "content": "word " * 600}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "word " * 600}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=long, max_tokens=4)
    assert "context length of 1024 tokens" in str(info.value)


def test_unknown_model_is_404_listing_served(client, model):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=openai_turns(), max_tokens=4)
    assert info.value.body["code"] == "model_not_found" and repr(model) in str(info.value)
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="dall-e-3", prompt="a fox")


def test_images_route_honours_guidance_seed_temperature(client, model):
    def png(**extra) -> bytes:
        result = client.images.generate(model=model, prompt="a lighthouse", n=1, extra_body={"seed": 3, **extra})
        return base64.b64decode(result.data[0].b64_json)

    default = png()
    assert png() == default  # the same seed: the same image
    assert png(guidance_scale=60.0) != default
    assert png(guidance_scale=60.0) == png(cfg_weight=60.0)
    assert png(cfg_weight=5.0) == default  # 5 is the default weight
    assert png(temperature=0.0) != default
    with pytest.raises(openai.BadRequestError):
        png(guidance_scale=1.0, cfg_weight=2.0)


def _native_text(server, image_bytes: bytes, prompt: str = "Describe it.") -> dict:
    r = httpx.post(server.url + "/v1/understand", timeout=60, json={
        "prompt": prompt, "images": [base64.b64encode(image_bytes).decode()], "max_new_tokens": MAX})
    assert r.status_code == 200, r.text
    return r.json()


def _oracle_single(oracle, image: Image.Image, prompt: str = "Describe it.") -> str:
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return oracle(turns, [image])[0]


@pytest.mark.parametrize("size", [(1, 1), (4, 1000), (1000, 2)])
def test_tiny_and_thin_images_are_answered_like_transformers(server, oracle, size):
    image = Image.fromarray((np.random.RandomState(1).rand(size[1], size[0], 3) * 255).astype("uint8"))
    assert _native_text(server, _png(image))["text"] == _oracle_single(oracle, image)


def test_exif_orientation_is_applied(server, oracle):
    upright = Image.fromarray((np.random.RandomState(2).rand(30, 60, 3) * 255).astype("uint8"))
    stored = upright.transpose(Image.Transpose.ROTATE_270)  # what a camera writes; EXIF 6 says "rotate back"
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    viewer = Image.open(io.BytesIO(buf.getvalue()))
    from PIL import ImageOps

    shown = ImageOps.exif_transpose(viewer).convert("RGB")
    assert shown.size == upright.size
    assert _native_text(server, buf.getvalue())["text"] == _oracle_single(oracle, shown)


def test_16_bit_png_is_scaled_to_8_bits(server, oracle):
    grey16 = Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16))
    data = _png(grey16)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    corrected = Image.new("RGB", (32, 32), (128, 128, 128))
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    text = _native_text(server, data)["text"]
    assert text == _oracle_single(oracle, corrected)
    assert _oracle_single(oracle, corrected) != _oracle_single(oracle, white)  # the test can tell them apart


@pytest.fixture(scope="module")
def janus_server(tiny_hf_dir, tmp_path_factory):
    """The Janus-Pro tiny checkpoint served with Janus-1.3B's roles and two served names."""
    proc = start_server(["serve", "--model", str(tiny_hf_dir), "--chat-format", "janus",
                         "--served-model-name", "janus-a", "--served-model-name", "janus-b"],
                        tmp_path_factory.mktemp("logs"))
    yield proc
    proc.stop()


def test_served_names_and_chat_format_flag(janus_server, tmp_path, oracle):
    from janus_core.text.prompts import chat_template

    client = openai.OpenAI(base_url=janus_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["janus-a", "janus-b"]
    reply = client.chat.completions.create(model="janus-b", messages=openai_turns(), max_tokens=MAX, temperature=0)
    assert reply.model == "janus-b"
    # the oracle: the same weights with a Janus-1.3B chat template
    from janus_core.tiny.janus import write_tiny_model

    path = write_tiny_model(tmp_path / "janus", "hf", variant="janus")
    assert JanusProcessor.from_pretrained(path).chat_template == chat_template("janus")
    expected, prompt_tokens = oracle(hf_turns(), [PICTURE], path)
    assert reply.choices[0].message.content == expected and reply.usage.prompt_tokens == prompt_tokens
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="janus-c", messages=openai_turns(), max_tokens=4)
    assert "'janus-a', 'janus-b'" in str(info.value)


def test_reflection_shows_the_conversation_form(server):
    import grpc
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        request = pool.FindMessageTypeByName("janus.v1.UnderstandRequest")
        field = request.fields_by_name["messages"]
        assert field.message_type.full_name == "janus.v1.Message"
        assert set(field.message_type.fields_by_name) == {"role", "text", "images"}
